"""``mmtune train | chat | export | check-data | demo`` — the command line (nothing imports this module)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_train(ns: argparse.Namespace) -> int:
    import os

    if ns.nproc and ns.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_ranks(ns)
    from mmtune.train import parse_config, run_sft

    metrics = run_sft(*parse_config(ns.config, ns.overrides))
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_options(ns: argparse.Namespace) -> int:
    """Every config key with its type, default and help, grouped; ``mmtune options lora`` filters."""
    from mmtune.train.args import describe_options

    text = describe_options(ns.filter)
    if not text:
        print(f"no option name or help contains {ns.filter!r}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _launch_ranks(ns: argparse.Namespace) -> int:
    """``--nproc N``: run this same command as N ranks on this machine under torch.distributed.run
    (torchrun), which sets RANK / LOCAL_RANK / WORLD_SIZE for the Trainer; returns the launcher's exit code.
    Several machines: start ``torchrun`` (or ``accelerate launch``) on each yourself (examples/distributed)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ns.nproc}",
           "-m", "mmtune.cli", "train", ns.config, *ns.overrides]
    return subprocess.call(cmd)


def cmd_demo(ns: argparse.Namespace) -> int:
    from mmtune.demo import run_demo

    result = run_demo(output_dir=ns.output_dir, max_steps=ns.max_steps)
    print(f"\nheld-out accuracy: {100 * result.accuracy:.1f}%   text-only baseline: "
          f"{100 * result.text_only_baseline:.1f}%   training: {result.train_seconds:.0f} s")
    for image, question, reply, truth in result.chat:
        print(f"chat  [{image}] {question} -> {reply!r}   (truth: {truth})")
    print(f"loss curve: {result.output_dir}/training_loss.png")
    return 0


def cmd_check_data(ns: argparse.Namespace) -> int:
    from mmtune.data.check import check_dataset
    from mmtune.model.loader import load_tokenizer_and_processor
    from mmtune.plugins import get_mm_plugin
    from mmtune.templates import get_template
    from mmtune.train import parse_config

    model_args, data_args, _, mm_args, _ = parse_config(ns.config, ns.overrides)
    tokenizer, processor = load_tokenizer_and_processor(model_args)
    template = get_template(data_args.template)
    plugin = get_mm_plugin(mm_args.plugin or template.plugin, media=data_args.media_config())
    report = check_dataset(data_args, template, plugin, tokenizer, processor)
    print(report.render())
    return 0 if report.ok else 1


def cmd_chat(ns: argparse.Namespace) -> int:
    from mmtune.infer import ChatEngine

    engine = ChatEngine(ns.model, adapter_path=ns.adapter, template=ns.template, max_new_tokens=ns.max_new_tokens)
    media = {"images": ns.image or [], "videos": ns.video or [], "audios": ns.audio or []}
    placeholders = "<image>" * len(media["images"]) + "<video>" * len(media["videos"]) + "<audio>" * len(media["audios"])
    history: list[dict[str, str]] = []
    prompts = [ns.prompt] if ns.prompt else None
    while True:
        text = prompts.pop(0) if prompts else (None if prompts is not None else input("user> "))
        if text is None or text.strip() in ("exit", "quit"):
            return 0
        content = (placeholders + text) if not history else text
        history.append({"role": "user", "content": content})
        pieces = []
        print("assistant> ", end="", flush=True)
        for piece in engine.stream(history, **media):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


def cmd_export(ns: argparse.Namespace) -> int:
    from mmtune.infer import export_model

    print(export_model(ns.model, ns.output_dir, adapter_path=ns.adapter, dtype=ns.dtype))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmtune", description="Fine-tune multimodal language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train from a YAML config (+ key=value overrides)",
        description="Train from a flat YAML config; key=value overrides apply after it "
                    "(e.g. learning_rate=2e-4 freeze_vision_tower=no).",
        epilog="Keys: `mmtune options` lists every key (model, data, finetuning, mmtune training, transformers' "
               "TrainingArguments) with its type, default and help; `mmtune options WORD` lists those that "
               "mention WORD.")
    train.add_argument("config", help="YAML file of key: value lines")
    train.add_argument("overrides", nargs="*", help="key=value pairs, applied after the file")
    train.add_argument("--nproc", type=int, default=None, help="launch N ranks on this machine (torchrun)")
    train.set_defaults(func=cmd_train)
    options = sub.add_parser("options", help="list every config key with its type, default and help")
    options.add_argument("filter", nargs="?", help="only keys whose name or help contains this (any case)")
    options.set_defaults(func=cmd_options)
    demo = sub.add_parser("demo", help="train a tiny VLM on synthetic shapes, on the CPU")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--max-steps", type=int, default=1500)
    demo.set_defaults(func=cmd_demo)
    check = sub.add_parser("check-data", help="read every sample, report problems by index and file")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*")
    check.set_defaults(func=cmd_check_data)
    chat = sub.add_parser("chat", help="chat with a model (or base + adapter), streaming")
    chat.add_argument("model")
    chat.add_argument("--adapter")
    chat.add_argument("--template")
    chat.add_argument("--image", action="append")
    chat.add_argument("--video", action="append")
    chat.add_argument("--audio", action="append")
    chat.add_argument("--prompt", help="one question, then exit (no interactive loop)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.set_defaults(func=cmd_chat)
    export = sub.add_parser("export", help="merge LoRA and save a model transformers can load")
    export.add_argument("model")
    export.add_argument("output_dir")
    export.add_argument("--adapter")
    export.add_argument("--dtype", default="auto")
    export.set_defaults(func=cmd_export)
    ns, extra = parser.parse_known_args(argv)
    if extra and ns.command == "train" and not any(e.startswith("-") for e in extra):
        ns.overrides += extra  # overrides after --nproc N
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging()
    from mmtune.hparams import ConfigError

    try:
        return ns.func(ns)
    except ConfigError as exc:  # a config mistake: one line, no traceback
        print(f"mmtune {ns.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
