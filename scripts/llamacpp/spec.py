#!/usr/bin/env python3
"""Writes check_exports.mjs's spec: the reference GGUF, the files to check, the tokenizer test texts (code with
spaces and tabs, Unicode, a literal ▁ beside spaces, chat markers of both families), the text whose NLL is
measured and the greedy prompt.

    python3 scripts/llamacpp/spec.py REFERENCE.gguf SPEC.json FILE.gguf...
"""

import json
import sys

TEXTS = [
    "def square(x):\n    \"\"\"Square.\"\"\"\n    return x**2  # end\n\n\tif x:\n\t\tpass\n",
    "Hello, world! Ünïcödé — 東京 🙂 and a literal \u2581 beside  two spaces.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<start_of_turn>user\nhi<end_of_turn>\n",
    "    indented by four\n        by eight\n                sixteen\n",
]
PPL = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
       "movable metal type, oil-based ink and a wooden press adapted from wine making. Within fifty years, "
       "presses had spread to more than two hundred cities across Europe, and the cost of books fell sharply. "
       "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n")

json.dump({"reference": sys.argv[1], "files": sys.argv[3:], "texts": TEXTS, "ppl_text": PPL,
           "prompt": "The capital of France is", "greedy_tokens": 24}, open(sys.argv[2], "w"))
