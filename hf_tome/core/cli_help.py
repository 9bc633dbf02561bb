"""argparse help shared by every hf-tome command (standard library only, so ``--help`` answers at once)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that writes a default as it is typed (a list as ``0.7 0.55``) and leaves
    out flags (``False``) and ``None`` defaults: an option whose default is ``None`` says in its help what
    happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if ("%(default)" in help_text or default is argparse.SUPPRESS or default is None or isinstance(default, bool)
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return help_text
        shown = " ".join(str(item) for item in default) if isinstance(default, list | tuple) else str(default)
        return f"{help_text} (default: {shown.replace('%', '%%')})"  # the help is %-formatted afterwards
