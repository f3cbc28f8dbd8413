"""Command line: ``python -m training stage1|stage2|progressive --config FILE.yaml``, ``prepare``, ``smoke``."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from emocast_core.cli.table import Arg, Command, arg, build_parser, run_cli


def _run_stage(args: argparse.Namespace) -> int:
    from .config import load_stage_config
    from .runner import train

    overrides = list(args.set or [])
    if args.max_steps is not None:
        overrides.append(f"solver.max_train_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"output.dir={args.output_dir}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    config = load_stage_config(args.config, overrides)
    wanted = int(args.command[-1])
    if config.stage != wanted:
        raise ValueError(f"{args.config} is a stage-{config.stage} config; run `python -m training "
                         f"stage{config.stage}` or set `stage: {wanted}`")
    result = train(config)
    print(f"stage {config.stage}: {_summary(result)}")
    return 0


def _summary(result) -> str:
    """Steps, last loss and checkpoint of a run (resumed and already finished runs say so)."""
    ran = len(result.losses)
    text = f"{result.steps} steps"
    if result.start_step:
        text += f" (resumed at step {result.start_step}, {ran} run now)" if ran else " (finished already)"
    if ran:
        text += f", last loss {result.losses[-1]:.5f}"
    return f"{text}; checkpoint {result.checkpoint}"


def _run_progressive(args: argparse.Namespace) -> int:
    from .progressive import load_progressive_config, run_progressive

    config = load_progressive_config(args.config)
    results = run_progressive(config, list(args.set or []))
    for phase, result in zip(config.phases, results):
        print(f"phase {phase.name}: {_summary(result)}")
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from emocast_core.preprocess.audio_features import Wav2Vec2AudioEncoder
    from emocast_core.preprocess.face import FaceAnalyzer

    from .data.metadata import discover_clips
    from .data.prepare import (ClipLabel, Preparer, PrepareSettings, link_neutral_videos, parse_mead_path,
                               prepare_all)

    if not args.mead and ((args.identity is None) == (not args.identity_per_video) or args.emotion is None):
        raise ValueError("give --mead (labels from MEAD paths), or --emotion with either --identity or "
                         "--identity-per-video")
    preparer = Preparer(FaceAnalyzer.from_folder(args.models / "face_analysis"),
                        Wav2Vec2AudioEncoder.from_pretrained(args.models / "wav2vec2"),
                        PrepareSettings(face_every=args.face_every))
    jobs = [(video, parse_mead_path(video) if args.mead else ClipLabel(
        video.stem, video.stem if args.identity_per_video else args.identity, args.emotion, args.intensity,
        args.source)) for video in args.videos]
    report = prepare_all(preparer, jobs, args.out)
    linked = link_neutral_videos(discover_clips([args.out]))
    print(f"{report.summary()}\nlinked {linked} emotional clip(s) to a neutral video of their identity")
    return 0


def _run_smoke(args: argparse.Namespace) -> int:
    import torch

    from .smoke import run_smoke

    torch.set_num_threads(1)  # the tiny model's ops are too small to gain from threads; they only contend
    result = run_smoke(args.out, steps=args.steps, size=args.size, phase_steps=args.phase_steps)
    for run, losses in result.losses.items():
        print(f"{run}: losses " + (", ".join(f"{v:.4f}" for v in losses) or "none (already finished)"))
    print(f"final checkpoint: {result.final_checkpoint}\ntiny model folder with the trained net: "
          f"{result.model_folder}")
    return 0


def _stage_args(stage: int) -> tuple[Arg, ...]:
    return (
        arg("--config", type=Path, required=True, help=f"YAML, e.g. training/configs/stage{stage}.yaml"),
        arg("--set", action="append", metavar="KEY=VALUE",
            help="override a config value, e.g. --set data.batch_size=4 (repeatable)"),
        arg("--max-steps", type=int, help="shortcut for --set solver.max_train_steps=N"),
        arg("--output-dir", help="shortcut for --set output.dir=DIR"),
        arg("--device", help="cpu, cuda, cuda:1 or auto"),
    )


def _progressive_args() -> tuple[Arg, ...]:
    return (
        arg("--config", type=Path, required=True, help="YAML, e.g. training/configs/progressive.yaml"),
        arg("--set", action="append", metavar="KEY=VALUE",
            help="override a value of the base stage-2 config in every phase (repeatable)"),
    )


def _prepare_args() -> tuple[Arg, ...]:
    return (
        arg("videos", type=Path, nargs="+", help="talking-head videos (square crops around the face)"),
        arg("--out", type=Path, required=True, help="dataset root to write the clip folders into"),
        arg("--models", type=Path, required=True, help="model folder with face_analysis/ and wav2vec2/"),
        arg("--mead", action="store_true", help="read identity / emotion / level from MEAD paths"),
        arg("--identity", help="identity of every video (without --mead)"),
        arg("--identity-per-video", action="store_true", help="each video is its own identity (HDTF)"),
        arg("--emotion", help="emotion of every video (without --mead)"),
        arg("--intensity", type=int, default=1, choices=(1, 2, 3)),
        arg("--source", default="", help="dataset name stored in meta.json (MEAD, HDTF, ...)"),
        arg("--face-every", type=int, default=1, help="run the face models on every n-th frame"),
    )


def _smoke_args() -> tuple[Arg, ...]:
    return (
        arg("--out", type=Path, default=Path("training_smoke"), help="output folder (rerun: resumes)"),
        arg("--steps", type=int, default=3, help="steps per stage"),
        arg("--phase-steps", type=int, default=2, help="steps per progressive phase"),
        arg("--size", type=int, default=64, help="image size (multiple of 64)"),
    )


COMMANDS: tuple[Command, ...] = (
    Command("stage1", "train stage 1 (image level: ReferenceNet, spatial UNet, FaceLocator, face projection)",
            _run_stage, lambda: _stage_args(1)),
    Command("stage2", "train stage 2 (video level: audio projection, audio and motion modules)",
            _run_stage, lambda: _stage_args(2)),
    Command("progressive", "stage 2 in data phases (paper §3.4.2), each resuming the last", _run_progressive,
            _progressive_args),
    Command("prepare", "videos -> prepared clip folders (frames, masks, embeddings, meta.json)", _run_prepare,
            _prepare_args),
    Command("smoke", "tiny models + synthetic talking-head videos: the whole chain (prepare, stage 1, stage 2, "
            "progressive phases) in a few CPU steps", _run_smoke, _smoke_args),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(COMMANDS, "python -m training", __doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
