"""`moechat experts ...`: look inside a package's experts (docs/architecture.md, "Experts").

Each subcommand registers itself here with its own ``add_*`` function and keeps its work
in its own module; this file only builds the argparse group.
"""

from __future__ import annotations

import argparse


def add_experts_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experts", help="routing statistics and expert tools for a MoE package")
    experts = p.add_subparsers(dest="experts_command", required=True)
    from moechat.app.experts_stats import add_stats

    add_stats(experts)
    from moechat.app.expert_tools_cli import add_expert_tools

    add_expert_tools(experts)
