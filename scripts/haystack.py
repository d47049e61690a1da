"""Write a passkey haystack as text for sample.py: the context of one passkey sequence
(S8's filler with the key hidden at a depth); the question 10 times, one per line; and the context with the
question after it, to read it all again for one question.

    python -m scripts.haystack 1048576 0.5 out/haystack
    # -> out/haystack.txt, out/haystack_questions.txt, out/haystack_and_question.txt
"""
import random
import sys

from data import QUESTION, get_tokenizer, make_passkey

def main() -> None:
    length, depth, prefix = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    enc = get_tokenizer("bytes")
    s = make_passkey(enc, length, depth, random.Random(21))
    with open(prefix + ".txt", "w", encoding="utf-8") as f:
        f.write(enc.decode(s.tokens(0, s.n_context).tolist()))
    with open(prefix + "_questions.txt", "w", encoding="utf-8") as f:
        f.write((QUESTION + "\n") * 10)
    with open(prefix + "_and_question.txt", "w", encoding="utf-8") as f:
        f.write(enc.decode(s.tokens(0, s.n_context + len(s.question)).tolist()))
    print(f"wrote {prefix}.txt ({s.n_context:,} tokens, the key {enc.decode(s.answer.tolist()).strip()} at depth "
          f"{depth:.0%}), {prefix}_questions.txt and {prefix}_and_question.txt")


if __name__ == "__main__":
    main()
