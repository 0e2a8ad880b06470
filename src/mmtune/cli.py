"""``mmtune train | demo`` — the command line (nothing imports this module)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_train(ns: argparse.Namespace) -> int:
    from mmtune.train import parse_config, run_sft

    metrics = run_sft(*parse_config(ns.config, ns.overrides))
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from mmtune.demo import run_demo

    result = run_demo(output_dir=ns.output_dir, max_steps=ns.max_steps)
    print(f"\nheld-out accuracy: {100 * result.accuracy:.1f}%   text-only baseline: "
          f"{100 * result.text_only_baseline:.1f}%   training: {result.train_seconds:.0f} s")
    for image, question, reply, truth in result.chat:
        print(f"chat  [{image}] {question} -> {reply!r}   (truth: {truth})")
    print(f"loss curve: {result.output_dir}/training_loss.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmtune", description="Fine-tune multimodal language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a YAML config (+ key=value overrides)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*")
    train.set_defaults(func=cmd_train)
    demo = sub.add_parser("demo", help="train a tiny VLM on synthetic shapes, on the CPU")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--max-steps", type=int, default=1500)
    demo.set_defaults(func=cmd_demo)
    ns = parser.parse_args(argv)
    _setup_logging()
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
