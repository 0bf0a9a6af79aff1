"""Command line: run the server, generate a config, register a user.

python -m mediarepo -c homeserver.yaml [-c workers/media.yaml ...]
python -m mediarepo --generate-config -c homeserver.yaml --server-name example.org
python -m mediarepo register-user -c homeserver.yaml @alice:example.org [--admin]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mediarepo.errors import ConfigError


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mediarepo",
        description="A Synapse-compatible Matrix media repository server.",
        epilog="Subcommand: register-user -c CONFIG USER_ID [--admin]",
    )
    parser.add_argument(
        "-c",
        "--config-path",
        action="append",
        required=True,
        help="a config file, or a directory of *.yaml files, to read; repeat it to "
        "merge several in order, as Synapse does (homeserver.yaml, then a worker file)",
    )
    parser.add_argument(
        "--generate-config",
        action="store_true",
        help="write a working config (and signing key) at --config-path, then exit",
    )
    parser.add_argument("--server-name", help="with --generate-config: the server's name")
    parser.add_argument(
        "--data-dir",
        help="with --generate-config: where the database, media and key go "
        "(default: beside the config)",
    )
    parser.add_argument("--port", type=int, default=8008, help="with --generate-config")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run this many server processes sharing the listening ports (default 1; "
        "about one per CPU core for CPU-bound loads)",
    )
    return parser


def _register_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mediarepo register-user",
        description="Create a user (or a new token for an existing one) and print "
        "the access token on the last line.",
    )
    parser.add_argument("-c", "--config-path", action="append", required=True)
    parser.add_argument("user_id", help="full Matrix ID, such as @alice:example.org")
    parser.add_argument("--admin", action="store_true", help="make the user a server admin")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "register-user":
            from mediarepo.cli import register_user

            options = _register_parser().parse_args(args[1:])
            return register_user(options.config_path, options.user_id, options.admin)
        options = _run_parser().parse_args(args)
        if options.generate_config:
            from mediarepo.cli import generate_config

            if not options.server_name:
                print("mediarepo: --generate-config needs --server-name", file=sys.stderr)
                return 2
            if len(options.config_path) != 1:
                print("mediarepo: --generate-config writes one file: give one -c", file=sys.stderr)
                return 2
            config_path = options.config_path[0]
            data_dir = options.data_dir or os.path.dirname(os.path.abspath(config_path))
            return generate_config(config_path, options.server_name, data_dir, options.port)
        from mediarepo.cli import run

        if options.workers < 1:
            print("mediarepo: --workers must be at least 1", file=sys.stderr)
            return 2
        return run(options.config_path, options.workers)
    except ConfigError as e:
        print(f"mediarepo: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
