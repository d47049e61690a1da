"""Write a passkey haystack as text for sample.py: the context of one passkey sequence
(S8's filler with the key hidden at a depth); the question 10 times, one per line; and the context with the
question after it, to read it all again for one question.

    python -m scripts.haystack 1048576 0.5 out/haystack
    # -> out/haystack.txt, out/haystack_questions.txt, out/haystack_and_question.txt
"""
import random
import sys

from checkpoint import write_atomically
from configurator import check_output
from data import QUESTION, get_tokenizer, make_passkey

USAGE = "usage: python -m scripts.haystack LENGTH DEPTH PREFIX, e.g. 1048576 0.5 out/haystack"


def ours(prefix: str):
    """The kind of file this script may replace: one of the three it wrote (its questions file says so)."""
    def test(path: str) -> bool:
        with open(prefix + "_questions.txt", encoding="utf-8") as f:
            return f.read() == (QUESTION + "\n") * 10
    return ("haystack file (PREFIX_questions.txt beside it)", test)


def main() -> None:
    try:
        length, depth, prefix = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
        enc = get_tokenizer("bytes")
        s = make_passkey(enc, length, depth, random.Random(21))
        files = {prefix + ".txt": enc.decode(s.tokens(0, s.n_context).tolist()),
                 prefix + "_questions.txt": (QUESTION + "\n") * 10,
                 prefix + "_and_question.txt": enc.decode(s.tokens(0, s.n_context + len(s.question)).tolist())}
        for path in files:
            check_output(path, "PREFIX", ours(prefix))
    except (IndexError, ValueError) as e:
        sys.exit(f"error: {e if isinstance(e, ValueError) else 'missing arguments'}; {USAGE}")
    for path, text in files.items():
        write_atomically(path, lambda f: f.write(text.encode()), mode=0o644)
    print(f"wrote {prefix}.txt ({s.n_context:,} tokens, the key {enc.decode(s.answer.tolist()).strip()} at depth "
          f"{depth:.0%}), {prefix}_questions.txt and {prefix}_and_question.txt")


if __name__ == "__main__":
    main()
