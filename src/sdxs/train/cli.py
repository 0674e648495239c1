"""`sdxs train unet|lora|vae|text-encoder`, `sdxs export`, `sdxs push`.

    sdxs train unet --config configs/tiny/unet.toml [section.key=value ...] [--resume latest]
    sdxs train text-align --config configs/emoji/text-align.toml   (the text encoder learns rewritten captions)
    sdxs train lora --config configs/emoji/lora-sepia.toml    (UNet LoRA -> RUN/export/pytorch_lora_weights.safetensors)
    accelerate launch --num_processes 2 -m sdxs.train.cli train unet --config ...    (multi-GPU / multi-node)
    sdxs export runs/unet out/ [--weights ema|raw] [--dtype fp16 --variant fp16]
    sdxs push out/ user/sdxs-tiny [--private]

`register(subparsers)` adds the commands to the top-level CLI; `python -m sdxs.train.cli ...` runs them alone.
User errors raise ValueError / FileNotFoundError / TypeError (the top-level CLI prints them as one line).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

TRAINERS = ("unet", "lora", "vae", "text-encoder", "text-align")


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train a UNet, UNet LoRA, VAE or text encoder (runs under accelerate launch)"
    )
    kinds = train.add_subparsers(dest="trainer", required=True, metavar="{unet,lora,vae,text-encoder,text-align}")
    for kind in TRAINERS:
        what = {
            "lora": "LoRA adapters of a pretrained UNet",
            "text-align": "the text encoder on rewritten captions, through the frozen UNet",
        }.get(kind, f"the {kind}")
        p = kinds.add_parser(kind, help=f"train {what} (see configs/ for recipes)")
        p.add_argument("--config", help="recipe file (.toml or .json); omitted keys keep their defaults")
        p.add_argument("--resume", metavar="latest|CHECKPOINT", help="continue the run in run.output_dir exactly")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="typed config overrides")
        p.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
        p.set_defaults(func=cmd_train)

    export = subparsers.add_parser("export", help="write a training run as a hub model folder (and reload it)")
    export.add_argument("run", help="the run folder (run.output_dir)")
    export.add_argument("out", help="output folder (hub layout)")
    export.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint folder")
    export.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"), help="EMA or raw weights")
    export.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast the saved weights")
    export.add_argument("--variant", help="diffusers weight variant name, e.g. fp16")
    export.add_argument("--license", default="apache-2.0", help="licence in the model card")
    export.add_argument("--dataset", action="append", dest="datasets", help="dataset id for the card (repeatable)")
    export.add_argument("--no-verify", action="store_true", help="skip reloading the folder with plain diffusers")
    export.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
    export.set_defaults(func=cmd_export)

    push = subparsers.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    push.add_argument("folder", help="an exported folder (has model_index.json)")
    push.add_argument("repo_id", help="user/name of the model repository (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token", help="HF token (default: the logged-in one / HF_TOKEN)")
    push.set_defaults(func=cmd_push)


def cmd_train(args) -> int:
    from sdxs.train.common import NonFiniteLossError, TrainingStopped
    from sdxs.train.config import (
        LoRATrainConfig,
        TextAlignTrainConfig,
        TextEncoderTrainConfig,
        UNetTrainConfig,
        VAETrainConfig,
        load_config,
    )

    _setup_logging(args.verbose)
    if args.trainer == "unet":
        from sdxs.train.unet import train_unet as train

        cls = UNetTrainConfig
    elif args.trainer == "lora":
        from sdxs.train.lora import train_lora as train

        cls = LoRATrainConfig
    elif args.trainer == "vae":
        from sdxs.train.vae import train_vae as train

        cls = VAETrainConfig
    elif args.trainer == "text-align":
        from sdxs.train.text_align import train_text_align as train

        cls = TextAlignTrainConfig
    else:
        from sdxs.train.text_encoder import train_text_encoder as train

        cls = TextEncoderTrainConfig
    cfg = load_config(cls, args.config, args.overrides)
    try:
        final = train(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except TrainingStopped as e:  # Ctrl-C / SIGTERM: a checkpoint of the step reached was written (stop.py)
        print(str(e), file=sys.stderr)
        return e.exit_code
    logging.getLogger("sdxs.train").info("final checkpoint: %s", final)
    return 0


def cmd_export(args) -> int:
    from sdxs.model_folder import export_run
    from sdxs.runtime import flag_values

    _setup_logging(args.verbose)
    flags = flag_values(args, "checkpoint weights dtype variant license datasets")
    print(export_run(args.run, args.out, verify=not args.no_verify, **flags))
    return 0


def cmd_push(args) -> int:
    from sdxs.model_folder import push_folder

    print(push_folder(args.folder, args.repo_id, private=args.private, token=args.token))
    return 0


def _setup_logging(verbose: bool = False) -> None:
    from sdxs.runtime import quiet_libraries

    quiet_libraries(verbose)  # library notes (slow-kernel fallbacks, config keys) only with -v, as in every command
    main = int(os.environ.get("RANK", "0")) == 0  # other ranks only warn
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO if main else logging.WARNING)
    logging.getLogger("sdxs.train").setLevel(logging.INFO if main else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdxs", description="SDXS training, export and publishing")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
