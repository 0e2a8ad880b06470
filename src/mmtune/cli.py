"""``mmtune train | predict | serve | chat | export | check-data | demo | env | options | families`` — the command line (nothing imports this module)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmtune.infer import ChatSession


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_train(ns: argparse.Namespace) -> int:
    import os

    if ns.nproc and ns.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_ranks(ns)
    from mmtune.config import parse_config
    from mmtune.train import run_sft

    metrics = run_sft(*parse_config(ns.config, ns.overrides))
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    """Batched generation over the config's data: predictions and metrics in its output_dir."""
    from mmtune.config import parse_predict_config
    from mmtune.infer.predict import predict

    results = predict(*parse_predict_config(ns.config, ns.overrides))
    print(json.dumps(results, indent=1))
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP server over a model folder (FastAPI + uvicorn)."""
    from mmtune.model.folders import check_saved_paths

    check_saved_paths(ns.model, ns.adapter)  # a missing or wrong folder: one line, before anything loads
    try:
        from mmtune.infer.serve import run_server
    except ImportError as exc:
        print(f"mmtune serve: error: {exc.name or exc} is not installed: pip install 'mmtune[serve]'", file=sys.stderr)
        return 2
    run_server(ns.model, adapter=ns.adapter, template=ns.template, dtype=ns.dtype, host=ns.host, port=ns.port,
               served_model_name=ns.served_model_name, max_batch_size=ns.max_batch_size,
               max_model_len=ns.max_model_len)
    return 0


def cmd_options(ns: argparse.Namespace) -> int:
    """Every config key with its type, default and help, grouped; ``mmtune options lora`` filters."""
    from mmtune.config import describe_options

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
    if ns.export_data:  # the examples' data set, no training
        from mmtune.demo import export_data

        for path in export_data(ns.export_data):
            print(path)
        return 0
    if ns.preference:  # DPO on synthetic pairs: held-out pairs ranked right, before and after
        from mmtune.demo import run_preference_demo

        pref = run_preference_demo(output_dir=ns.output_dir, **({"max_steps": ns.max_steps} if ns.max_steps else {}))
        print(f"\nheld-out pairs ranked right: {100 * pref.accuracy_before:.1f}% before, "
              f"{100 * pref.accuracy_after:.1f}% after DPO   mean log-likelihood margin: {pref.margin_before:.2f} -> "
              f"{pref.margin_after:.2f}   training: {pref.train_seconds:.0f} s")
        print(f"loss and reward curves: {pref.output_dir}/trainer_log.jsonl, {pref.output_dir}/training_loss.png")
        return 0
    from mmtune.demo import run_demo

    result = run_demo(output_dir=ns.output_dir, **({"max_steps": ns.max_steps} if ns.max_steps else {}))
    print(f"\nheld-out accuracy: {100 * result.accuracy:.1f}%   text-only baseline: "
          f"{100 * result.text_only_baseline:.1f}%   training: {result.train_seconds:.0f} s")
    for image, question, reply, truth in result.chat:
        print(f"chat  [{image}] {question} -> {reply!r}   (truth: {truth})")
    print(f"loss curve: {result.output_dir}/training_loss.png")
    return 0


def cmd_check_data(ns: argparse.Namespace) -> int:
    """Read every sample of the config's data as training would (the same template, plugin and
    tokenizer, from :func:`mmtune.train.recipe.build`), without loading the model."""
    from mmtune.config import parse_config
    from mmtune.data.check import check_dataset
    from mmtune.train import recipe

    model_args, data_args, finetuning_args, mm_args, _ = parse_config(ns.config, ns.overrides)
    parts = recipe.build(model_args, data_args, finetuning_args, mm_args=mm_args, datasets=False, model=False)
    report = check_dataset(parts.data_args, parts.template, parts.plugin, parts.tokenizer, parts.processor,
                           preference=finetuning_args.preference_data)
    print(report.render())
    return 0 if report.ok else 1


CHAT_HELP = ("Type a message. /image PATH, /video PATH, /audio PATH attach a file to your next message; "
             "clear: new conversation; exit, quit or Ctrl-D: leave; Ctrl-C stops an answer.")


def _chat_turn(session: ChatSession, text: str) -> bool:
    """Stream one answer; False when it failed (the error is printed, the turn dropped)."""
    from mmtune.media import MediaError

    print("assistant> ", end="", flush=True)
    try:
        for piece in session.ask(text):
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print("\n(answer stopped; the turn and its attachments are dropped)")
        return False
    except (MediaError, OSError, ValueError) as exc:
        print(f"\nerror: {exc} (the turn and its attachments are dropped)", file=sys.stderr)
        return False
    print()
    return True


def cmd_chat(ns: argparse.Namespace) -> int:
    """Interactive chat (or one ``--prompt``): see ``CHAT_HELP`` for the commands."""
    import os

    from mmtune.infer import ChatEngine, ChatSession, GenerationOptions
    from mmtune.model.folders import check_saved_paths

    check_saved_paths(ns.model, ns.adapter)  # a missing or wrong folder: one line, before anything loads
    try:
        options = GenerationOptions(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p,
                                    top_k=ns.top_k, repetition_penalty=ns.repetition_penalty)
    except ValueError as exc:
        print(f"mmtune chat: error: {exc}", file=sys.stderr)
        return 2
    attached = [(kind, path) for kind in ("image", "video", "audio") for path in getattr(ns, kind) or []]
    for kind, path in attached:  # before the model loads
        if not os.path.isfile(path):
            print(f"mmtune chat: error: --{kind} {path}: no such file", file=sys.stderr)
            return 2
    engine = ChatEngine(ns.model, adapter_path=ns.adapter, template=ns.template, dtype=ns.dtype, generation=options)
    session = ChatSession(engine, system=ns.system)
    for kind, path in attached:
        session.attach(kind, path)
    if ns.prompt is not None:
        return 0 if _chat_turn(session, ns.prompt) else 1
    print(CHAT_HELP)
    while True:
        try:
            line = input("user> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt
            print()
            return 0
        text = line.strip()
        command, _, arg = text.partition(" ")
        if not text:
            continue
        if text.lower() in ("exit", "quit", "/exit", "/quit"):
            return 0
        if text.lower() in ("clear", "/clear"):
            session.clear()
            print("(new conversation)")
        elif command.lower() in ("/image", "/video", "/audio"):
            if not arg.strip():
                print(f"usage: {command.lower()} PATH")
                continue
            try:
                path = session.attach(command[1:].lower(), arg)
            except (OSError, ValueError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            print(f"({command[1:].lower()} {path} goes with your next message)")
        elif text.startswith("/"):
            print(f"unknown command {command!r}. {CHAT_HELP}")
        else:
            _chat_turn(session, text)


def cmd_env(ns: argparse.Namespace) -> int:
    """Versions, device and (given a model or a YAML config) the speed levers a run would get."""
    from mmtune.env import format_report

    print(format_report(ns.target))
    return 0


def family_rows() -> list[dict[str, object]]:
    """One row per registered model type, from the registries alone (``COMPOSITE_MODELS``,
    ``PLUGINS``, ``TEMPLATES``) and the family's ``SpeedCapabilities``: its modalities (the media
    tokens its plugin has), its default template and the others bound to the same plugin, its
    packing layout (or why it has none), and the levers that need a family's declaration and get
    one (the other levers apply to every model)."""
    import mmtune  # noqa: F401  (fills the registries)
    from mmtune.model.composite import COMPOSITE_MODELS
    from mmtune.plugins import PLUGINS
    from mmtune.speed import fused_loss, sync_free, vision_varlen
    from mmtune.templates import TEMPLATES

    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        CONFIG_MAPPING_NAMES = {}
    rows = []
    for model_type, entry in sorted(COMPOSITE_MODELS.items()):
        default = TEMPLATES.get(entry.template) if entry.template else None
        plugin_name = model_type if model_type in PLUGINS else (default.plugin if default is not None else None)
        plugin = PLUGINS.get(plugin_name) if plugin_name and plugin_name != "base" else None
        # None: no plugin of its own, so no media placeholder is expanded (text-only runs)
        modalities = ([kind for kind in ("image", "video", "audio") if getattr(plugin, f"default_{kind}_token", None)]
                      if plugin is not None else None)
        templates = [entry.template] if entry.template else []
        if plugin is not None:  # the templates bound to its plugin (or its default template's)
            own = {plugin_name, default.plugin if default is not None else plugin_name}
            templates += sorted(n for n, t in TEMPLATES.items() if t.plugin in own and n not in templates)
        speed = entry.speed
        levers = [lever.NAME for lever, declared in ((fused_loss, speed.fusable_head),
                                                     (vision_varlen, bool(speed.varlen_attention_classes)),
                                                     (sync_free, speed.tower_inputs is not None)) if declared]
        rows.append({"model_type": model_type, "modalities": modalities, "plugin": plugin_name if plugin else None,
                     "templates": templates, "packing": entry.packing, "no_packing": entry.no_packing,
                     "levers": levers, "in_transformers": model_type in CONFIG_MAPPING_NAMES})
    return rows


def cmd_families(ns: argparse.Namespace) -> int:
    """Every registered model type: modalities, templates, packing and the declared levers."""
    rows = family_rows()
    if ns.json:
        print(json.dumps(rows, indent=1))
        return 0
    head = ("model type", "media", "templates (default first)", "packing", "levers declared")
    table = [head] + [(r["model_type"] + ("" if r["in_transformers"] else " (not in transformers)"),
                       "text only (no plugin)" if r["modalities"] is None else ",".join(r["modalities"]),
                       ", ".join(r["templates"]) or "(none: name one)",
                       r["packing"] or "no", ", ".join(r["levers"]) or "-") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nEvery model type also gets the levers no family declares (liger, tower-no-grad, checkpointing, "
          "block-graphs, compile), where its modules allow; `mmtune env MODEL` shows what a model really gets.")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from mmtune.infer import export_model
    from mmtune.model.folders import check_saved_paths

    check_saved_paths(ns.model, ns.adapter)  # a missing or wrong folder: one line, before any load or write
    print(export_model(ns.model, ns.output_dir, adapter_path=ns.adapter, dtype=ns.dtype, template=ns.template,
                       overwrite=ns.overwrite))
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
    predict = sub.add_parser(
        "predict", help="generate answers over a data set; predictions + metrics (exact match, accuracy, BLEU, ROUGE)",
        description="Batched generation over a config's data (with val_size: the part training held out) with any "
                    "folder mmtune writes (model_name_or_path; adapter_name_or_path). Writes OUTPUT_DIR/"
                    "generated_predictions.jsonl and predict_results.json; a rerun with the same settings resumes.",
        epilog="Keys: `mmtune options predict` lists the prediction keys (output_dir, predict_batch_size, "
               "max_new_tokens, temperature, top_p, top_k, backend, ...); a training config's own keys are ignored.")
    predict.add_argument("config", help="YAML file of key: value lines (a training config works)")
    predict.add_argument("overrides", nargs="*", help="key=value pairs, applied after the file")
    predict.set_defaults(func=cmd_predict)
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models)",
                           description="Serve a folder mmtune wrote (or a model) over the OpenAI chat completions "
                                       "API: text, image_url (data URLs, local paths), video and audio content "
                                       "parts, streaming or not; concurrent requests are batched. Needs "
                                       "`pip install 'mmtune[serve]'`.",
                           epilog="Decoding is greedy unless a request sets temperature > 0.")
    serve.add_argument("model", help="model folder or Hub id; an adapter folder alone names its base")
    serve.add_argument("--adapter", help="a LoRA adapter folder to put on MODEL")
    serve.add_argument("--template", help="chat template; default: the folder's, else the model type's")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the model id clients name (default: MODEL's folder name)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="most requests generated together")
    serve.add_argument("--max-model-len", type=int, help="most tokens of prompt + answer (default: the model's "
                                                         "max_position_embeddings)")
    serve.add_argument("--dtype", default="auto")
    serve.set_defaults(func=cmd_serve)
    options = sub.add_parser("options", help="list every config key with its type, default and help")
    options.add_argument("filter", nargs="?", help="only keys whose name or help contains this (any case)")
    options.set_defaults(func=cmd_options)
    demo = sub.add_parser("demo", help="train a tiny VLM on synthetic shapes, on the CPU")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--max-steps", type=int, default=None, help="training steps (default: 1500; with "
                      "--preference, that demo's own)")
    demo.add_argument("--preference", action="store_true", help="the preference demo instead: DPO on synthetic "
                      "pairs (true answer chosen, a wrong one rejected), held-out pairs ranked right before and after")
    demo.add_argument("--export-data", metavar="DIR", help="write the data set examples/*.yaml train on (the demo's "
                      "shapes, a video, audio, ShareGPT and LLaVA-style json) into DIR and exit; examples/data is "
                      "`mmtune demo --export-data examples/data`")
    demo.set_defaults(func=cmd_demo)
    check = sub.add_parser("check-data", help="read every sample, report problems by index and file")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*")
    check.set_defaults(func=cmd_check_data)
    chat = sub.add_parser("chat", help="chat with a model (or base + adapter), streaming",
                          description="Chat with any folder mmtune writes (output folder, checkpoint-N, export) or a "
                                      "model. " + CHAT_HELP, epilog="Decoding is greedy unless --temperature > 0.")
    chat.add_argument("model", help="model folder or Hub id; an adapter folder alone names its base")
    chat.add_argument("--adapter", help="a LoRA adapter folder to put on MODEL")
    chat.add_argument("--template", help="chat template; default: the folder's mmtune_config.json, else the "
                                         "model type's declared template")
    chat.add_argument("--image", action="append", help="attach to the first message (repeatable)")
    chat.add_argument("--video", action="append", help="attach to the first message (repeatable)")
    chat.add_argument("--audio", action="append", help="attach to the first message (repeatable)")
    chat.add_argument("--prompt", help="one question, then exit (no interactive loop)")
    chat.add_argument("--system", help="system prompt (default: the template's)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, the same answer every "
                                                                     "time; above 0: sampling")
    chat.add_argument("--top-p", type=float, help="nucleus sampling (with --temperature > 0); default: off")
    chat.add_argument("--top-k", type=int, help="top-k sampling (with --temperature > 0); default: off")
    chat.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeats; default: 1 (none)")
    chat.add_argument("--dtype", default="auto")
    chat.set_defaults(func=cmd_chat)
    export = sub.add_parser("export", help="merge LoRA and save a model transformers can load",
                            description="Export a folder mmtune wrote (output folder or checkpoint-N; LoRA merged) "
                                        "as a model + processor + mmtune_config.json that transformers loads and "
                                        "`mmtune chat` opens without flags.")
    export.add_argument("model", help="model folder, or an adapter folder (its adapter_config.json names the base)")
    export.add_argument("output_dir")
    export.add_argument("--adapter", help="a LoRA adapter folder to merge into MODEL")
    export.add_argument("--template", help="record this template instead of the folder's")
    export.add_argument("--dtype", default="auto")
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty OUTPUT_DIR: the model files an earlier export or run left "
                             "there are removed first, other files are kept (never the model, adapter or base "
                             "folder)")
    export.set_defaults(func=cmd_export)
    env = sub.add_parser("env", help="versions, device and the speed levers a model or config would get",
                         description="Print python / torch / transformers / peft / accelerate / datasets / tokenizers "
                                     "versions (each against its tested range), optional libraries, the device and, "
                                     "given a model folder, Hub id or YAML config, the speed levers `mmtune train` "
                                     "would apply to it on this machine (the model is built without weights).")
    env.add_argument("target", nargs="?", metavar="MODEL_OR_CONFIG", help="model folder, Hub id or YAML config")
    env.set_defaults(func=cmd_env)
    families = sub.add_parser("families", help="every model family: media, templates, packing, declared levers",
                              description="List every registered model type: the media its plugin takes, its "
                                          "chat templates (the default first), its packing layout, and the speed "
                                          "levers its family declares what they need for.")
    families.add_argument("--json", action="store_true", help="one JSON list of rows instead of a table")
    families.set_defaults(func=cmd_families)
    ns, extra = parser.parse_known_args(argv)
    if extra and ns.command in ("train", "predict") and not any(e.startswith("-") for e in extra):
        ns.overrides += extra  # overrides after --nproc N
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging()
    from mmtune.errors import UserError
    from mmtune.config import ConfigError

    try:
        return ns.func(ns)
    except (ConfigError, UserError) as exc:  # a config, data or folder mistake: one line, no traceback
        print(f"mmtune {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or training stopped by a signal (its message): one line, 128 + signal
        print(f"mmtune {ns.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
