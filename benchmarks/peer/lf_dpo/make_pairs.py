"""Preference pairs from the peer harness's data (prepare.py's bench.json): every row's prompt (the user turn with
its image) stays, its answer becomes ``chosen`` and the next row's answer (the same length, about 192 tokens)
``rejected``, in LLaMA-Factory's ranking ShareGPT form (``messages`` ending with the user's turn, ``chosen`` and
``rejected`` assistant turns, ``images``), which mmtune's stage dpo reads too. Registers it as ``bench_pairs``
(``ranking: true``) in the folder's dataset_info.json beside the existing entries.

Usage: python make_pairs.py [DATA_DIR]   (default /tmp/lfbench/data; writes DATA_DIR/bench_pairs.json)
"""

import json
import os
import sys


def make_pairs(rows: list) -> list:
    pairs = []
    for i, row in enumerate(rows):
        *prompt, answer = row["messages"]
        other = rows[(i + 1) % len(rows)]["messages"][-1]
        if answer["role"] != "assistant" or other["role"] != "assistant" or not prompt:
            raise ValueError(f"row {i} of bench.json: expected a conversation ending with the assistant's answer")
        rejected = other["content"] if other["content"] != answer["content"] else answer["content"][::-1]
        pairs.append({
            "messages": prompt,
            "chosen": {"role": "assistant", "content": answer["content"]},
            "rejected": {"role": "assistant", "content": rejected},
            "images": row["images"],
        })
    return pairs


def main(data_dir: str) -> str:
    with open(os.path.join(data_dir, "bench.json")) as f:
        rows = json.load(f)
    path = os.path.join(data_dir, "bench_pairs.json")
    with open(path, "w") as f:
        json.dump(make_pairs(rows), f)
    info_path = os.path.join(data_dir, "dataset_info.json")
    info = json.load(open(info_path)) if os.path.isfile(info_path) else {}
    info["bench_pairs"] = {
        "file_name": "bench_pairs.json",
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    print(f"[make_pairs] {len(rows)} pairs -> {path}", flush=True)
    return path


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lfbench/data")
