"""``ringserve models pull|list``."""

from __future__ import annotations

import argparse

from loguru import logger

from engine.repository import scan

BUILDERS = ("ssd-mobilenet-v2-coco", "efficientnet-lite0")


def command(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        configs, failed = scan(args.repo)
        for cfg in configs:
            print(f"{cfg.name}\t{cfg.task}\tversions {','.join(map(str, cfg.versions))}")
        for name, why in failed.items():
            print(f"{name}\tFAILED\t{why}")
        return 1 if failed else 0
    from engine.convert import ConvertError

    try:
        if args.name == "ssd-mobilenet-v2-coco":
            from engine.convert import pull_default

            path = pull_default(args.repo, force=args.force)
        elif args.name == "efficientnet-lite0":
            from engine.convert_efficientnet import pull_efficientnet

            path = pull_efficientnet(args.repo, force=args.force)
        else:
            logger.error("unknown model {!r}; known: {}", args.name, ", ".join(BUILDERS))
            return 2
    except ConvertError as exc:
        logger.error("{}", exc)
        return 1
    logger.info("model ready in {}", path)
    return 0
