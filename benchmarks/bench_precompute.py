"""Stage-3 throughput: encoder ceiling vs. this stage vs. the seed's naive loop, same model and images.

(a) encoder only: the N images are decoded and preprocessed BEFORE the clock starts; timed is
    only ``backbone.encode`` on batches of ``--batch-size`` (the ceiling of any stage-3 design).
(b) this stage: ``modules.stages.precompute_sam_outputs.run_precompute`` into a fresh temporary project root
    (image decoding in DataLoader workers, batched encoder, one decoder call per image, HDF5).
(c) the seed's naive loop: per image read + preprocess + a batch-of-one encode, then per prompt
    set one decoder call and one folder with logits.npy, pos_map.npy, neg_map.npy, meta.json.

Usage: python benchmarks/bench_precompute.py --family sam --model-type demo_tiny --images 8
       --promptsets 10 --device cpu [--checkpoint PATH] (random weights when no checkpoint)
       [--verify 2] [--no-naive] [--profile]. Before the figures are printed, the cache that (b)
       wrote is checked on --verify images against synchronous encoder and decoder passes.

Encoder paths (``sam.encoder_impl``, modules/sam/fast_encoder.py): ``--encoder-impl reference,fast``
measures (a) and (b) once per path on the same loaded model (the path is switched in place), and
prints per path the encoder img/s, the FLOP per image, the model FLOP utilisation against
``--peak-tflops`` (default: the GPU's dense bf16 peak from ``PEAK_BF16_TFLOPS``; none on a CPU),
the compile time (``--compile-encoder``; paid once, before the clock starts) and b/a; then the
speed-up against the first path and the agreement of the cached logits between the first path and
each other (max |logit difference|, IoU of the thresholded masks). (c) runs with the first path.
``--json PATH`` also writes these figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.sam.fast_encoder import ENCODER_IMPLS, EncoderSettings  # noqa: E402
from modules.sam.registry import build_sam_model, load_backbone  # noqa: E402
from modules.core.config import load_config  # noqa: E402
from modules.data.imageio import read_image_rgb  # noqa: E402
from modules.data.manifest import SPLITS  # noqa: E402
from modules.data.sample_files import split_samples  # noqa: E402
from modules.sam.prompting import MULTIMASK_POLICIES, PROMPT_MODES  # noqa: E402
from modules.stages.precompute_sam_outputs import run_precompute  # noqa: E402
from modules.data.promptset import gaussian_prompt_maps, load_promptsets, promptset_tensors  # noqa: E402
from modules.cache.sam_cache import SamCache  # noqa: E402
from modules.core.stage import Shard  # noqa: E402


def write_images(root: Path, count: int, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        group = f"g{i % 2}"
        (root / "images" / group).mkdir(parents=True, exist_ok=True)
        (root / "masks" / group).mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[:height, :width]
        mask = (yy - height / 2) ** 2 + (xx - width / 2 - 10 * (i % 5)) ** 2 < (min(height, width) / 4) ** 2
        image = rng.integers(0, 150, (height, width, 3), dtype=np.uint8)
        image[mask] += 90
        Image.fromarray(image).save(root / "images" / group / f"s{i:04d}.jpg", quality=90)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / group / f"s{i:04d}.png")


def make_project(folder: Path, args, checkpoint: Path) -> Path:
    write_images(folder / "data", args.images, args.height, args.width)
    config = {
        "data": {"images_root": str(folder / "data/images"), "masks_root": str(folder / "data/masks"),
                 "project_root": str(folder / "project"), "split_fractions": [1.0, 0.0, 0.0]},
        "demo": {"enabled": False},
        "prompt_generation": {f"num_promptsets_{s}": args.promptsets for s in SPLITS},
        "sam": {"family": args.family, "model_type": args.model_type, "checkpoint": str(checkpoint),
                "device": args.device, "encoder_batch_size": args.batch_size, "num_workers": args.workers,
                "cache_writer": args.cache_writer},
        "wandb": {"enabled": False},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    for script in ("build_manifests.py", "generate_promptsets.py"):
        subprocess.run([sys.executable, str(REPO / script), "--config", str(path)], check=True,
                       capture_output=True, cwd=REPO)
    return path


#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched against
#: ``torch.cuda.get_device_name()``. NVIDIA's data sheets print the "with sparsity" figure, twice
#: these: H200 SXM 1,979 -> 989.4 (H200 data sheet, same tensor cores as the H100 SXM), A100 624 -> 312.
PEAK_BF16_TFLOPS = {"H200": 989.4, "A100": 312.0}


def default_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of this CUDA device from ``PEAK_BF16_TFLOPS``; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_encoder(backbone, rows, batch_size) -> float:
    pixels = [backbone.preprocess(read_image_rgb(r["image_path"])) for r in rows]
    synchronize(backbone.device)
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        batch = torch.stack(pixels[i:i + batch_size]).to(backbone.device, non_blocking=True)
        backbone.encode(batch)
    synchronize(backbone.device)
    return time.perf_counter() - start


def flop_ceiling(backbone, row, promptsets: int) -> tuple[float, float]:
    """GFLOP of one image's encoder pass and of one decoder call on ``promptsets`` prompt sets.

    Whatever the pipeline does, (b) also pays for the decoder, so when both run at the same FLOP
    rate b/a cannot exceed ``encoder / (encoder + decoder)``; this prints that bound.
    """
    from torch.utils import flop_counter

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    # torch's counter knows the GPU attention kernels, not the CPU one (it would count 0).
    attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    image = read_image_rgb(row["image_path"])
    with flop_counter.FlopCounterMode(display=False, custom_mapping=attention) as counter:
        features = backbone.encode(backbone.preprocess(image)[None].to(backbone.device))
    encoder = counter.get_total_flops()
    points = torch.rand(promptsets, 4, 2) * torch.tensor([image.shape[1], image.shape[0]], dtype=torch.float32)
    labels = torch.tensor([[1, 0, 1, 0]] * promptsets)
    with flop_counter.FlopCounterMode(display=False, custom_mapping=attention) as counter:
        backbone.decode(features, image.shape[:2], points, labels, None, None, True)
    return encoder / 1e9, counter.get_total_flops() / 1e9


def verify_cache(backbone, cfg, rows, count: int) -> str:
    """Check (b)'s cache against synchronous passes on its first ``count`` images: decoding from
    the cached embedding must give the stored logits, and a batch-of-one encode the cached
    features (up to the rounding of a different batch size). Raises on a mismatch."""
    cache = SamCache(cfg.project_root)
    policy = MULTIMASK_POLICIES[cfg.sam.multimask_policy]
    worst_logits = worst_features = 0.0
    for row in rows[:count]:
        entry = cache.entry(row["safe_id"], verify=True)
        features = {k: torch.from_numpy(v)[None].to(backbone.device) for k, v in entry.features.items()}
        record = load_promptsets(cfg.project_root, "train", row["safe_id"])
        points, labels, _, boxes = promptset_tensors(record)
        prompts = PROMPT_MODES[cfg.sam.prompt_mode](points, labels, boxes)
        logits, iou = backbone.decode(features, entry.original_hw, prompts.point_coords, prompts.point_labels,
                                      prompts.boxes, None, policy.multimask_output)
        chosen, _ = policy.select(logits, iou)
        stored = torch.from_numpy(entry.logits).float()
        worst_logits = max(worst_logits, float((chosen.float().cpu() - stored).abs().max()))
        fresh = backbone.encode(backbone.preprocess(read_image_rgb(row["image_path"]))[None].to(backbone.device))
        for name, value in fresh.items():
            cached = torch.from_numpy(entry.features[name]).float()
            relative = float((value[0].float().cpu() - cached).abs().mean() / cached.abs().mean().clamp_min(1e-12))
            worst_features = max(worst_features, relative)
    cache.close()
    text = (f"verify ({count} images): max |logit - decode(cached embedding)| = {worst_logits:.4f}, "
            f"features vs batch-of-one encode: mean relative difference {worst_features:.4f}")
    if worst_logits > 0.25 or worst_features > 0.05:
        raise SystemExit(f"cache does not match synchronous passes: {text}")
    return text


def bench_naive(backbone, project_root: Path, rows, sigma: float, out: Path) -> float:
    synchronize(backbone.device)
    start = time.perf_counter()
    for row in rows:
        image = read_image_rgb(row["image_path"])
        features = backbone.encode(backbone.preprocess(image)[None].to(backbone.device))
        record = load_promptsets(project_root, "train", row["safe_id"])
        for prompt_set in record["promptsets"]:
            single = {**record, "promptsets": [prompt_set]}
            points, labels, points_256, _ = promptset_tensors(single)
            logits, iou = backbone.decode(features, image.shape[:2], points, labels, None, None, True)
            best = int(iou[0].argmax())
            maps = gaussian_prompt_maps(points_256, labels, sigma)[0]
            folder = out / row["safe_id"] / f"promptset_{prompt_set['promptset_id']:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / "logits_256.npy", logits[0, best].cpu().numpy().astype(np.float16))
            np.save(folder / "pos_map.npy", maps[0].numpy().astype(np.float16))
            np.save(folder / "neg_map.npy", maps[1].numpy().astype(np.float16))
            (folder / "meta.json").write_text(json.dumps({"iou": iou[0].tolist(), "branch": best}))
    synchronize(backbone.device)
    return time.perf_counter() - start


def cached_logits(cfg, rows) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The cached logits (``P x 256 x 256`` float32) and selected outputs (``P``) of every row, by safe id."""
    cache = SamCache(cfg.project_root)
    try:
        entries = {row["safe_id"]: cache.entry(row["safe_id"], verify=True) for row in rows}
        return {key: (entry.logits.astype(np.float32), np.asarray(entry.branch_index)) for key, entry in entries.items()}
    finally:
        cache.close()


def logit_agreement(reference: dict, other: dict) -> dict:
    """Between two caches of the same rows (``cached_logits``): the max |logit difference|, the IoU
    of the masks ``logit > 0`` per cached mask (two empty masks agree: IoU 1), and the fraction of
    prompt sets whose selected output (``sam.multimask_policy``) is the same."""
    worst, ious, same_branch = 0.0, [], []
    for key, (ref, ref_branch) in reference.items():
        logits, branch = other[key]
        worst = max(worst, float(np.abs(ref - logits).max()))
        a, b = (ref > 0).reshape(len(ref), -1), (logits > 0).reshape(len(logits), -1)
        inter, union = (a & b).sum(axis=1), (a | b).sum(axis=1)
        ious.extend(np.where(union > 0, inter / np.maximum(union, 1), 1.0).tolist())
        same_branch.extend((ref_branch == branch).tolist())
    return {"max_logit_diff": worst, "mean_mask_iou": float(np.mean(ious)), "min_mask_iou": float(np.min(ious)),
            "same_output": float(np.mean(same_branch)), "masks": len(ious)}


def timed_encode(backbone, images) -> float:
    synchronize(backbone.device)
    start = time.perf_counter()
    backbone.encode(images)
    synchronize(backbone.device)
    return time.perf_counter() - start


INT8_SUFFIX = "+int8"


def encoder_settings(path_name: str, args) -> EncoderSettings:
    """``--encoder-impl`` entry -> settings: an impl, with ``+int8`` int8 encoder weights (``sam.encoder_int8``)."""
    impl = path_name.removesuffix(INT8_SUFFIX)
    return EncoderSettings(impl, args.compile_encoder, args.batch_size, int8=path_name.endswith(INT8_SUFFIX))


def measure_path(backbone, impl: str, args, cfg, rows, first: bool) -> dict:
    """(a), (b), FLOP, compile time and the cached logits of one encoder path (``impl``)."""
    resolved = backbone.configure_encoder(encoder_settings(impl, args))
    # Warm-up at the timed batch size, so that (a) pays neither CUDA's first-call setup nor compilation.
    warm_pixels = backbone.preprocess(read_image_rgb(rows[0]["image_path"]))
    warm = torch.stack([warm_pixels] * min(args.batch_size, len(rows))).to(backbone.device)
    first_call_s = timed_encode(backbone, warm)
    steady_s = timed_encode(backbone, warm)
    with backbone.encoder_runner.eager():  # the dispatch-mode FLOP counter runs the eager encoder
        encoder_gflop, decoder_gflop = flop_ceiling(backbone, rows[0], args.promptsets)
    encoder_s = bench_encoder(backbone, rows, args.batch_size)
    start = time.perf_counter()
    result = run_precompute(cfg, backbone, Shard(), force=not first)
    stage_s = time.perf_counter() - start
    assert result.counts.done == len(rows), result.counts
    n = len(rows)
    peak = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(backbone.device)
    encoder_tflops = encoder_gflop * n / encoder_s / 1e3
    return {
        "impl": impl, "resolved": resolved.describe(), "encoder_s": encoder_s, "stage_s": stage_s,
        "encoder_images_per_s": n / encoder_s, "stage_images_per_s": n / stage_s, "b_over_a": encoder_s / stage_s,
        "encoder_gflop_per_image": encoder_gflop, "decoder_gflop_per_image": decoder_gflop,
        "encoder_tflops": encoder_tflops, "peak_tflops": peak, "mfu": encoder_tflops / peak if peak else None,
        "first_call_s": first_call_s, "compile_s": max(first_call_s - steady_s, 0.0) if resolved.compiled else None,
        "cache_bytes": result.shard_path.stat().st_size,
        "verify": verify_cache(backbone, cfg, rows, min(args.verify, n)),
    }


def batch_sweep(backbone, path_name: str, args, rows, sizes: list[int]) -> dict[int, float]:
    """Encoder-only img/s of one path at each encoder batch size (each warmed up first: with
    ``--compile-encoder`` every size compiles its own static-shape graph, not timed)."""
    pixels = torch.stack([backbone.preprocess(read_image_rgb(rows[0]["image_path"]))] * max(sizes))
    settings = encoder_settings(path_name, args)
    throughput = {}
    for size in sizes:
        backbone.configure_encoder(dataclasses.replace(settings, batch_size=size))
        timed_encode(backbone, pixels[:size].to(backbone.device))
        throughput[size] = len(rows) / bench_encoder(backbone, rows, size)
        print(f"encoder batch {size:3d}: {throughput[size]:8.3f} images/s ({path_name})", flush=True)
    return throughput


def print_path(path: dict, n: int, p: int) -> None:
    print(f"--- encoder path {path['impl']} ({path['resolved']})")
    for name, seconds in (("(a) encoder only", path["encoder_s"]), ("(b) this stage", path["stage_s"])):
        print(f"{name:18s} {seconds:8.2f} s  {n / seconds:8.3f} images/s  {n * p / seconds:8.2f} prompt sets/s")
    print(path["verify"])
    print(f"b/a (fraction of the encoder ceiling): {path['b_over_a']:.3f}")
    mfu = (f", {100 * path['mfu']:.1f}% of a {path['peak_tflops']:.1f} TFLOP/s peak (MFU)" if path["mfu"] is not None
           else " (no peak known for this device: --peak-tflops)")
    print(f"encoder: {path['encoder_tflops']:.3f} TFLOP/s{mfu}")
    compile_s = "not compiled" if path["compile_s"] is None else f"compile {path['compile_s']:.1f} s"
    print(f"first encoder call {path['first_call_s']:.2f} s ({compile_s}; not in (a) or (b))", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sam")
    parser.add_argument("--model-type", default="demo_tiny")
    parser.add_argument("--checkpoint", default=None, help="default: random weights saved to a temp file")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--promptsets", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--verify", type=int, default=2,
                        help="check (b)'s cache on this many images against synchronous passes")
    parser.add_argument("--no-naive", action="store_true", help="skip (c), e.g. for a long steady-state run")
    parser.add_argument("--profile", action="store_true",
                        help="also print where (b) spends its time (cProfile, top 25 by cumulative time)")
    parser.add_argument("--encoder-impl", default="auto",
                        help="comma-separated sam.encoder_impl values to measure in turn, e.g. reference,fast; "
                             "a +int8 suffix (fast+int8) adds int8 encoder weights, last: they are not undone")
    parser.add_argument("--compile-encoder", default="auto", choices=["auto", "true", "false"],
                        help="sam.compile_encoder for every path")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for the FLOP utilisation (default: PEAK_BF16_TFLOPS on a known GPU)")
    parser.add_argument("--cache-writer", default="process", choices=["process", "thread"],
                        help="who writes the shard file in (b) (sam.cache_writer)")
    parser.add_argument("--batch-sweep", default="",
                        help="comma-separated encoder batch sizes: encoder-only img/s of the last path at each")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    try:
        sweep_sizes = [int(size) for size in args.batch_sweep.split(",") if size.strip()]
    except ValueError:
        sweep_sizes = [0]
    if any(size < 1 for size in sweep_sizes):
        parser.error(f"--batch-sweep: expected positive integers, got {args.batch_sweep!r}")
    args.compile_encoder = {"true": True, "false": False}.get(args.compile_encoder, args.compile_encoder)
    impls = [name.strip() for name in args.encoder_impl.split(",") if name.strip()]
    unknown = [name for name in impls if name.removesuffix(INT8_SUFFIX) != "auto"
               and name.removesuffix(INT8_SUFFIX) not in ENCODER_IMPLS]
    if unknown or not impls:
        parser.error(f"--encoder-impl: {unknown or 'none given'}; expected auto or {sorted(ENCODER_IMPLS)}, "
                     f"optionally with {INT8_SUFFIX}")
    int8_flags = [name.endswith(INT8_SUFFIX) for name in impls]
    if int8_flags != sorted(int8_flags):
        parser.error(f"--encoder-impl: the {INT8_SUFFIX} paths go last (int8 weights are not undone)")

    n, p = args.images, args.promptsets
    paths, agreements = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_precompute_") as tmp:
        folder = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else folder / "random.pt"
        if not args.checkpoint:
            torch.manual_seed(0)
            torch.save(build_sam_model(args.family, args.model_type).state_dict(), checkpoint)
        config = make_project(folder, args, checkpoint)
        cfg = load_config(config)
        backbone = load_backbone(args.family, args.model_type, checkpoint, args.device,
                                 encoder=encoder_settings(impls[0], args))
        rows = split_samples(cfg, "train").to_dict("records")
        n = len(rows)
        print(f"model {args.family}/{args.model_type}, device {args.device}, {n} images "
              f"{args.height}x{args.width}, {p} prompt sets each, encoder batch {args.batch_size}, "
              f"{args.workers} workers, torch threads {torch.get_num_threads()}", flush=True)
        reference_logits = None
        for index, impl in enumerate(impls):
            path = measure_path(backbone, impl, args, cfg, rows, first=index == 0)
            logits = cached_logits(cfg, rows)
            if reference_logits is None:
                reference_logits = logits
            else:
                agreements[impl] = logit_agreement(reference_logits, logits)
            paths.append(path)
            print_path(path, n, p)
        sweep = batch_sweep(backbone, impls[-1], args, rows, sweep_sizes) if sweep_sizes else {}
        backbone.configure_encoder(dataclasses.replace(encoder_settings(impls[0], args), int8=backbone.encoder_int8))
        naive_s = naive_bytes = None
        if not args.no_naive:
            naive_s = bench_naive(backbone, cfg.project_root, rows, cfg.prompt_generation.gaussian_sigma,
                                  folder / "naive")
            naive_bytes = sum(p.stat().st_size for p in (folder / "naive").rglob("*") if p.is_file())
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(run_precompute, cfg, backbone, Shard(), force=True)
            print("(b) profiled (force rerun), top 25 by cumulative time:")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)

    first = paths[0]
    print("--- summary")
    if naive_s is not None:
        print(f"{'(c) naive loop':18s} {naive_s:8.2f} s  {n / naive_s:8.3f} images/s  {n * p / naive_s:8.2f} prompt sets/s"
              f"  (encoder path {first['impl']})")
        print(f"b/c (speed-up over the naive loop):    {naive_s / first['stage_s']:.3f}")
    print(f"{'path':24s} {'(a) img/s':>10s} {'(b) img/s':>10s} {'b/a':>6s} {'GFLOP/img':>10s} {'MFU':>6s} "
          f"{'compile s':>9s} {'(a) vs ' + first['impl']:>14s}")
    for path in paths:
        mfu = "-" if path["mfu"] is None else f"{100 * path['mfu']:.1f}%"
        compile_s = "-" if path["compile_s"] is None else f"{path['compile_s']:.1f}"
        print(f"{path['resolved']:24s} {path['encoder_images_per_s']:10.3f} {path['stage_images_per_s']:10.3f} "
              f"{path['b_over_a']:6.3f} {path['encoder_gflop_per_image']:10.1f} {mfu:>6s} {compile_s:>9s} "
              f"{first['encoder_s'] / path['encoder_s']:14.3f}")
    for impl, agreement in agreements.items():
        print(f"cached logits, {impl} vs {first['impl']}: max |logit difference| {agreement['max_logit_diff']:.4f}, "
              f"mask IoU (logit > 0) mean {agreement['mean_mask_iou']:.4f}, min {agreement['min_mask_iou']:.4f} "
              f"over {agreement['masks']} masks; same selected output for {100 * agreement['same_output']:.1f}%")
    encoder_gflop, decoder_gflop = first["encoder_gflop_per_image"], first["decoder_gflop_per_image"]
    print(f"FLOP per image: encoder {encoder_gflop:.1f} GFLOP, decoder on {p} prompt sets {decoder_gflop:.1f} GFLOP; "
          f"b/a at equal FLOP rates cannot exceed {encoder_gflop / (encoder_gflop + decoder_gflop):.3f}")
    if sweep:
        best = max(sweep, key=sweep.get)
        print(f"encoder batch sweep ({impls[-1]}): best {best} at {sweep[best]:.3f} images/s; "
              + ", ".join(f"{size}: {rate / sweep[best]:.2f}x" for size, rate in sweep.items()))
    cache_bytes = first["cache_bytes"]
    print(f"cache: {cache_bytes / n / 2**20:.2f} MiB per image, {cache_bytes / (n * p) / 2**10:.1f} KiB per prompt set"
          + (f" (naive files: {naive_bytes / (n * p) / 2**10:.1f} KiB per prompt set)" if naive_bytes else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": f"{args.family}/{args.model_type}", "device": args.device, "images": n, "promptsets": p,
            "batch_size": args.batch_size, "workers": args.workers, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else None,
            "paths": paths, "logit_agreement": agreements, "naive_s": naive_s,
            "batch_sweep": {str(size): rate for size, rate in sweep.items()}}, indent=1))


if __name__ == "__main__":
    main()
