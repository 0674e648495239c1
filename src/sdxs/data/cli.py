"""CLI subcommands of the data package: `sdxs prepare`, `sdxs data emoji`, `sdxs data merge`.

The top-level `sdxs` CLI calls `register(subparsers)`; each subcommand sets `func(args) -> int`. User errors are
raised as ValueError / FileNotFoundError, which the top-level CLI prints as one line.
"""

from __future__ import annotations

import argparse
import json

from sdxs.data.sources import SOURCE_FORMATS
from sdxs.runtime import DTYPE_NAMES

PREPARE_EPILOG = """examples:
  sdxs prepare photos/ cache/photos --model path/to/sdxs-emoji
  sdxs prepare emoji/train cache/emoji --model . --batch-size 64 --device cuda
  sdxs prepare big/ cache/big --model . --num-shards 4 --shard-index 0   # then: sdxs data merge cache/big
  sdxs prepare laion/{00000..00099}.tar cache/laion --model .         # WebDataset shards (img2dataset)
  sdxs prepare hf_saved/ cache/hf --model . --image-column jpg --caption-column caption   # HF dataset
  accelerate launch --num_processes 8 -m sdxs prepare laion/ cache/laion --model .   # one part per rank, merged
"""

DATA_EPILOG = """examples:
  sdxs data emoji data/emoji                       # Fluent Emoji 3D via npm: train/ validation/ splits.jsonl
  sdxs data emoji data/emoji3 --styles 3d,twemoji,noto   # + Twemoji and Noto, style tags, held-out pairs
  sdxs data merge cache/big                        # after all --shard-index runs wrote into cache/big
  sdxs data merge cache/big host1/cache host2/cache
"""


def register(subparsers) -> None:
    """Add `prepare` and `data` (emoji, merge) to the top-level `sdxs` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "prepare",
        help="encode images + captions (folder, WebDataset tars, HF dataset) into latent shards for training",
        description="Encode images (VAE encoder) and captions (text encoder) into a resumable latent cache.",
        epilog=PREPARE_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument(
        "src",
        help="folder of images with .txt sidecars or metadata.jsonl/csv (searched recursively); WebDataset .tar "
        "shards (a folder, one .tar or a brace pattern); or a local HF dataset (save_to_disk folder, parquet/arrow)",
    )
    p.add_argument("out", help="cache folder (reruns resume)")
    p.add_argument("--model", required=True, help="exported SDXS model folder (only vae, text encoder, tokenizer load)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder pass (default 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default=None, help="text-encoder dtype (default bf16 on cuda)"
    )
    p.add_argument("--min-side", type=int, default=None, help="smallest bucket side at output resolution")
    p.add_argument("--max-side", type=int, default=None, help="largest bucket side at output resolution")
    p.add_argument("--step", type=int, default=None, help="bucket side step (default: the model's size step)")
    p.add_argument("--max-area", type=int, default=None, help="largest bucket area (default: the model's default size)")
    p.add_argument("--allow-upscale", action="store_true", help="keep images smaller than their bucket")
    p.add_argument("--max-upscale", type=float, default=1.25, help="tolerated upscale onto the encoder input")
    p.add_argument("--background", default="255,255,255", help="R,G,B behind transparent pixels (default white)")
    p.add_argument(
        "--format",
        dest="source_format",
        choices=SOURCE_FORMATS,
        default="auto",
        help="what SRC is (default auto: .tar shards -> webdataset, save_to_disk/parquet/arrow -> hf, else folder)",
    )
    p.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl/csv or the HF dataset")
    p.add_argument("--image-column", default="image", help="image column of the HF dataset (default image)")
    p.add_argument("--shard-size", type=int, default=512, help="images per shard (one bucket per shard)")
    p.add_argument(
        "--num-shards", type=int, default=None, help="split the inputs over this many workers (default 1, or the ranks)"
    )
    p.add_argument(
        "--shard-index", type=int, default=None, help="this worker's index in [0, num-shards) (default 0, or the rank)"
    )
    p.add_argument("--offload-text-encoder", action="store_true", help="text encoder on CPU during the VAE pass")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding threads")
    p.add_argument(
        "--image-embeds",
        action="store_true",
        help="also store encode_image embeddings of each image (UNet training with flow.image_prompt_fraction)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a cache in OUT made with another model or other options (default: refuse, change nothing)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (nor the libraries' loading bars)")
    p.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
    p.set_defaults(func=run_prepare)

    data = subparsers.add_parser(
        "data", help="datasets: the emoji set, merging split caches", epilog=DATA_EPILOG, formatter_class=fmt
    )
    sub = data.add_subparsers(dest="data_command", required=True)
    e = sub.add_parser("emoji", help="download Fluent Emoji 3D via npm and write the captioned folder")
    e.add_argument("out", help="target folder (train/, validation/, splits.jsonl, LICENSES/)")
    e.add_argument("--cache-dir", default=None, help="npm tarball cache (default ~/.cache/sdxs/npm or $SDXS_CACHE)")
    e.add_argument(
        "--styles",
        default="3d",
        help="comma-separated styles: 3d (Fluent 3D, MIT), twemoji (CC-BY 4.0), noto (Apache-2.0); the first is the "
        "default style (bare-name captions); more than one adds held-out (emoji, style) pairs (default: 3d)",
    )
    e.set_defaults(func=run_emoji)
    m = sub.add_parser("merge", help="combine the partial manifests of a --num-shards run into manifest.json")
    m.add_argument("out", help="cache folder to write manifest.json in")
    m.add_argument("inputs", nargs="*", help="other cache folders whose parts are copied into OUT first")
    m.set_defaults(func=run_merge)


def _background(text: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(v) for v in text.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"`--background` must be R,G,B with values 0-255 (e.g. 255,255,255), got {text!r}.")
    return rgb


def run_prepare(args) -> int:
    from sdxs.data.prepare import prepare
    from sdxs.runtime import flag_values, quiet_libraries, torch_dtype

    quiet_libraries(verbose=args.verbose, progress=not args.no_progress)
    launched = _launched_part(args)
    flags = flag_values(
        args,
        "model batch_size device min_side max_side step max_area allow_upscale max_upscale caption_column "
        "source_format image_column shard_size num_shards shard_index offload_text_encoder num_workers image_embeds "
        "overwrite",
    )
    manifest = prepare(
        args.src,
        args.out,
        dtype=torch_dtype(args.dtype) if args.dtype else None,
        background=_background(args.background),
        progress=not args.no_progress,
        **flags,
    )
    part = f" (part {args.shard_index + 1} of {args.num_shards})" if args.num_shards > 1 else ""
    print(
        f"{manifest['count_written']} of {manifest['count_in']} inputs written to {args.out}{part} "
        f"({manifest['count_skipped']} skipped, reasons in the manifest); buckets: {json.dumps(manifest['counts'])}"
    )
    if launched:
        from sdxs.data.launch import merge_if_complete

        merged = merge_if_complete(args.out, args.num_shards)
        if merged is not None:
            print(f"merged all {args.num_shards} parts: {merged['count_written']} of {merged['count_in']} written")
    return 0


def _launched_part(args) -> bool:
    """Under `accelerate launch` (or torchrun, mpirun) set `--num-shards/--shard-index` (and the device) from the
    rank -> True; else fill in the defaults -> False."""
    from sdxs.data.launch import launched_rank, rank_device

    rank = launched_rank()
    if rank is None:
        args.num_shards = 1 if args.num_shards is None else args.num_shards
        args.shard_index = 0 if args.shard_index is None else args.shard_index
        return False
    if args.num_shards is not None or args.shard_index is not None:
        raise ValueError(
            f"`--num-shards`/`--shard-index` are taken from the launcher (rank {rank[0]} of {rank[1]}) under "
            "accelerate launch; drop them, or run `sdxs prepare` without the launcher to choose them yourself."
        )
    args.shard_index, args.num_shards = rank[0], rank[1]
    args.device = args.device or str(rank_device(rank[2]))
    return True


def run_emoji(args) -> int:
    from sdxs.data.emoji import make_emoji_dataset

    s = make_emoji_dataset(args.out, cache_dir=args.cache_dir, styles=args.styles)
    print(
        f"{s['images']} captioned emoji in {s['out']}: train {s['train']}, validation {s['validation']} "
        f"({s['held_out_emoji']} unseen emoji, {s['held_out_tones']} unseen skin-tone variants"
        + (f", {s['held_out_pairs']} unseen (emoji, style) pairs)" if "per_style" in s else ")")
    )
    for style, c in s.get("per_style", {}).items():
        print(f"  {style}: {c['images']} images, train {c['train']}, validation {c['validation']}")
    return 0


def run_merge(args) -> int:
    from sdxs.data.prepare import merge

    m = merge(args.out, args.inputs)
    print(
        f"merged {len(m['shards'])} shards: {m['count_written']} of {m['count_in']} files, {m['count_skipped']} skipped"
    )
    return 0
