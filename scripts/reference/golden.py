"""Produces tests/fixtures/smollm2_golden.json: reference token ids and logits from llama.cpp
(an implementation independent of this project) for the default model.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/ref/bin/python scripts/reference/golden.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        tests/fixtures/smollm2_golden.json
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

TOKENIZER_CASES = [
    "Hello world",
    "  leading spaces and trailing   ",
    "digits 1234567890 and 3.14159, 1,000,000",
    "naïve café — 日本語のテキスト 🤖 emoji",
    "tabs\t\tand\n\n\nnewlines \r\n end",
    "don't you'll I'M we've",
    "x=1+2;y=[3,4]{'a': \"b\"}",
    "<|im_start|>user\nWhat can damage buildings?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos",
]

PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nAnswer the question using the context.\n\nContext:\n"
    "- earthquakes can damage buildings.\n\nQuestion: What can damage buildings?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TOP = 10


def main(model_path, out_path):
    llm = Llama(model_path=model_path, n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    cases = [
        {"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)}
        for t in TOKENIZER_CASES
    ]
    ids = llm.tokenize(PROMPT.encode("utf-8"), add_bos=False, special=True)
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
    positions = []
    for row in scores:
        top = np.argsort(-row)[:TOP]
        positions.append({"top_ids": top.tolist(), "top_logits": [float(row[i]) for i in top]})
    greedy = llm.create_completion(PROMPT, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    json.dump(
        {
            "producer": "llama.cpp via llama-cpp-python, Q4_1 GGUF, n_threads=2",
            "tokenizer_cases": cases,
            "prompt": PROMPT,
            "prompt_ids": ids,
            "positions": positions,
            "greedy_12": greedy,
        },
        open(out_path, "w"),
        indent=1,
        ensure_ascii=False,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
