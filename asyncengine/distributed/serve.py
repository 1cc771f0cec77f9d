"""`asyncengine serve --replicas N [--ray-address ADDR]`: start or join a Ray cluster,
start N replicas on a placement group, serve one front for all of them."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from asyncengine.config import EngineConfig
from asyncengine.distributed.group import GroupOptions, ReplicaGroup

log = logging.getLogger(__name__)


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=1,
                        help="data-parallel engine replicas as Ray actors behind one front (default 1: no Ray)")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (default: start a local one)")
    parser.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])


def wants_replicas(args: argparse.Namespace) -> bool:
    return getattr(args, "replicas", 1) > 1 or getattr(args, "ray_address", None) is not None


def replica_config(config: EngineConfig, options: GroupOptions) -> EngineConfig:
    """Each replica uses the threads its bundle reserves, unless told otherwise."""
    if config.num_threads is None and options.num_cpus_per_replica >= 1:
        return config.with_options(num_threads=int(options.num_cpus_per_replica))
    return config


def serve_replicated(args: argparse.Namespace, config: EngineConfig, names: list[str] | None,
                     app_options: dict[str, Any]) -> None:
    """The front on args.host:port over args.replicas replicas, each serving the single
    server's app with `app_options` (api.server.create_app's keywords)."""
    import ray
    from aiohttp import web

    from api.server import _new_loop
    from asyncengine.distributed.front import Front

    options = GroupOptions(args.replicas, args.num_cpus_per_replica, args.num_gpus_per_replica,
                           args.placement_strategy)
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=True)
    config = replica_config(config, options)
    tokenizer, block_size = _front_tokenizer(config), config.block_size
    loop = _new_loop(not getattr(args, "no_uvloop", False))
    from api.limits import run_options
    from api.server import limits_from_args

    group = loop.run_until_complete(
        ReplicaGroup.start(config, options, names, {**app_options, "limits": limits_from_args(args)}))
    front = Front(group, tokenizer, block_size, admin_key=args.admin_key,
                  allowed_weights_dir=Path(args.allowed_weights_dir) if args.allowed_weights_dir else None)
    app = front.app()
    from api.auth import add_api_key

    add_api_key(app, getattr(args, "api_key", None))  # checked at the front, before any proxying

    async def stop(_: web.Application) -> None:
        await group.shutdown()

    app.on_cleanup.append(stop)
    log.info("serving %d replicas on http://%s:%d: %s", options.num_replicas, args.host, args.port,
             ", ".join(r.url for r in group.replicas))
    web.run_app(app, host=args.host, port=args.port, loop=loop, **run_options(limits_from_args(args), None))


def _front_tokenizer(config: EngineConfig) -> Any | None:
    """The model's tokenizer, for prefix routing of text prompts (None: ids only)."""
    from asyncengine.model_files import resolve_model

    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(resolve_model(config.model)))
    except Exception:
        log.warning("no tokenizer at the front: only token-id prompts are routed by prefix")
        return None
