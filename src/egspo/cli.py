"""The ``egspo`` command line: thin wrappers that parse arguments, call the library and report.

    egspo config [--config FILE] [section.field=value ...]   print the resolved configuration
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import yaml

from egspo.config import ConfigError, load_config

logger = logging.getLogger("egspo")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (sections: model, sampler, rl, task, train, eval).")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.field=value",
        help="Overrides applied after the file, e.g. rl.beta=0.0 train.max_steps=10.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egspo",
        description="RL fine-tuning of diffusion language models: EGSPO-SA and diffu-GRPO.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="Print the resolved configuration (defaults + file + overrides).")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        logger.error("Configuration error: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
