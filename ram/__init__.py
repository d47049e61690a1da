"""RAM ("Read As Human", docs/design.md S9), the contrast to CoMeT, and its tasks: built on the core, never imported
by it. `python -m ram.train_ram`, `python -m ram.eval_ram`, `python -m ram.needle` (from the repository's root)."""
