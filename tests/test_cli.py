"""The ``hf-tome`` command line: a light, fast parser, ``--version``, and every option's default in its help."""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import subprocess
import sys

import pytest
from hf_tome_server import options as serve_args

import hf_tome
from hf_tome.budgets import options as search_args
from hf_tome.cli import main as cli
from hf_tome.core import cli_help
from hf_tome.dcvit import options as compress_args

HEAVY = ("torch", "transformers", "litserve", "datasets", "matplotlib", "accelerate")


def _python(code: str) -> subprocess.CompletedProcess:
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_import_hf_tome_imports_neither_torch_nor_transformers():
    finished = _python(f"import sys, hf_tome; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert finished.stdout.strip() == "[]"


def test_the_parser_and_every_help_are_built_without_heavy_imports_in_under_2_s():
    code = f"""
import json, sys, time
start = time.perf_counter()
from hf_tome.cli.main import build_parser
parser = build_parser()
texts = [parser.format_help()]
for action in parser._actions:
    for sub in (getattr(action, "choices", None) or {{}}).values():
        texts.append(sub.format_help())
print(json.dumps({{"seconds": time.perf_counter() - start, "helps": len(texts),
                  "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    result = json.loads(_python(code).stdout)
    assert result["heavy"] == [] and result["helps"] == 7  # the top parser and its 6 subcommands
    assert result["seconds"] < 2.0


@pytest.mark.parametrize("args", [["--help"], ["search", "--help"], ["serve", "--help"], ["compress", "--help"],
                                  ["export", "--help"], ["--version"]])
def test_help_and_version_exit_0_without_importing_torch(args):
    code = (f"import sys\nfrom hf_tome.cli.main import main\ntry:\n    main({args!r})\nexcept SystemExit as exit:\n"
            f"    print('exit', exit.code, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert _python(code).stdout.strip().splitlines()[-1] == "exit 0 []"


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"hf-tome {importlib.metadata.version('hf-tome')}\n"
    assert importlib.metadata.version("hf-tome") == hf_tome.__version__ == "0.1.0"


def test_version_falls_back_to_the_package_version(monkeypatch):
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == hf_tome.__version__ == "0.1.0"


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    top = cli.build_parser()
    parsers = {"hf-tome": top, **{f"hf-tome {name}": sub for name, sub in _subparsers(top).items()}}
    for name, add in (("hf_tome.budgets.search", search_args.add_search_arguments),
                      ("hf_tome.dcvit.compress", compress_args.add_compress_arguments),
                      ("hf_tome_server", serve_args.add_serve_arguments)):
        parsers[name] = argparse.ArgumentParser(prog=name, formatter_class=cli_help.DefaultsHelpFormatter)
        add(parsers[name])
    return parsers


def test_every_parser_uses_the_defaults_formatter():
    for name, parser in _all_parsers().items():
        assert parser.formatter_class is cli_help.DefaultsHelpFormatter, name


def test_every_option_has_help_showing_its_default_once():
    shown = 0
    for name, parser in _all_parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue  # subcommands, --help, --version
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            text = formatter._expand_help(action)
            assert text.count("(default:") <= 1, f"{name} {action.option_strings[0]}: {text!r}"
            if action.default is None or isinstance(action.default, bool):
                assert "(default: None)" not in text and "(default: False)" not in text
                continue
            default = action.default
            expected = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
            assert text.endswith(f"(default: {expected})"), f"{name} {action.option_strings[0]}: {text!r}"
            shown += 1
    assert shown == 136  # bench 5 + export 3 + (serve 16 + search 22 + compress 26) twice: as hf-tome X and python -m


@pytest.mark.parametrize("command, option, expected", [
    ("search", "--strategy", "(default: halving)"),
    ("search", "--tome-seeds", "(default: 0.0 -0.5 0.5)"),
    ("search", "--tome-decays", "(default: 0.8 0.85 0.9)"),
    ("search", "--targets", "(default: 0.7 0.55)"),
    ("search", "--stage-images", "staged, 64 256 1024)"),
    ("search", "--split", "(default: train)"),
    ("search", "--out", "(default: results/search)"),
    ("compress", "--lr", "(default: 3e-05)"),
    ("compress", "--mixed-precision", "default: whatever `accelerate launch` / `accelerate config` says"),
    ("serve", "--budget", "(default: full=r:0 half=macs:0.5)"),
    ("serve", "--max-body-bytes", "(default: 10485760)"),
    ("bench", "--split", "(default: test)"),
    ("bench", "--batch-size", "(default: 64)"),
])
def test_help_text_shows_the_default(command, option, expected, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert expected in text
    assert text.count(f"{option} ") >= 1 and "(default: None)" not in text and "(default: False)" not in text
    assert "(default: train) (default: train)" not in text and "(default: test) (default: test)" not in text


@pytest.mark.parametrize("module", ["hf_tome.budgets.search", "hf_tome.dcvit.compress"])
def test_python_m_parsers_show_defaults(module, capsys):
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("(default: halving)" if module.endswith("search") else "(default: 0.75)") in text


def test_the_server_parser_shows_defaults(monkeypatch, capsys):
    from hf_tome_server import app

    monkeypatch.setattr(app, "run_server", lambda options: pytest.fail("--help must not start a server"))
    with pytest.raises(SystemExit) as exit:
        app.main(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--port PORT port to listen on (default: 8000)" in text


def test_parser_defaults_agree_with_the_options_dataclasses():
    from hf_tome.budgets.search import options_from_args as search_options
    from hf_tome.dcvit.compress import options_from_args as compress_options

    parser = cli.build_parser()
    assert search_options(parser.parse_args(["search"])) == search_args.SearchOptions()
    assert compress_options(parser.parse_args(["compress"])) == compress_args.CompressOptions()


def test_serve_defaults_agree_with_the_server():
    from hf_tome_server import app
    from hf_tome_server.budgets import DEFAULT_BUDGET_SPECS
    from hf_tome_server.guard import Limits

    assert serve_args.SERVE_BUDGETS == DEFAULT_BUDGET_SPECS
    limits = Limits()
    assert (serve_args.SERVE_MAX_BODY_BYTES, serve_args.SERVE_MAX_PIXELS) == (limits.max_body_bytes, limits.max_pixels)
    assert app.options_from_args(cli.build_parser().parse_args(["serve"])) == app.ServerOptions()
    options = app.options_from_args(cli.build_parser().parse_args(["serve", "--budget", "fast=r:16"]))
    assert options.budgets == ["fast=r:16"]  # given budgets replace the default ones
    # the guard, its decode pool and the HTTP protocol default to what the command line does
    from hf_tome_server.guard import RequestGuard
    from hf_tome_server.pool import DecodePool
    from hf_tome_server.protocol import GuardedH11Protocol

    defaults = app.ServerOptions()
    guard = inspect.signature(RequestGuard).parameters
    names = ("decode_workers", "decode_queue", "decode_pool", "read_timeout", "inline_pixels")
    assert [guard[name].default for name in names] == [getattr(defaults, name) for name in names]
    pool = inspect.signature(DecodePool).parameters
    assert (pool["workers"].default, pool["queue"].default, pool["inline_pixels"].default) == (
        defaults.decode_workers, defaults.decode_queue, defaults.inline_pixels)
    assert (GuardedH11Protocol.header_timeout, GuardedH11Protocol.max_header_bytes) == (defaults.read_timeout,
                                                                                        defaults.max_header_bytes)
    assert (defaults.device, defaults.dtype, defaults.compile) == ("auto", "float32", False)
    options = app.options_from_args(cli.build_parser().parse_args(
        ["serve", "--device", "cuda", "--dtype", "float16", "--compile", "--decode-workers", "2", "--decode-queue", "0",
         "--decode-pool", "process", "--read-timeout", "2.5", "--max-header-bytes", "8192"]))
    assert (options.device, options.dtype, options.compile, options.decode_workers, options.decode_queue,
            options.decode_pool, options.read_timeout, options.max_header_bytes) == (
        "cuda", "float16", True, 2, 0, "process", 2.5, 8192)
    for bad in (["--decode-workers", "0"], ["--decode-queue", "-1"], ["--read-timeout", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", *bad])


def test_the_old_import_paths_still_work():
    from hf_tome_server.app import add_serve_arguments

    from hf_tome.budgets.search import SearchOptions, add_search_arguments
    from hf_tome.dcvit.compress import CompressOptions, add_compress_arguments

    assert (SearchOptions, add_search_arguments) == (search_args.SearchOptions, search_args.add_search_arguments)
    assert CompressOptions is compress_args.CompressOptions
    assert add_compress_arguments is compress_args.add_compress_arguments
    assert add_serve_arguments is serve_args.add_serve_arguments


def test_public_names_load_on_first_use():
    import hf_tome.integration.loading
    import hf_tome.integration.patch

    assert hf_tome.__all__ == sorted(hf_tome.__all__) and len(hf_tome.__all__) == 19
    assert set(hf_tome.__all__) == set(hf_tome._ORIGINS) and set(hf_tome.__all__) <= set(dir(hf_tome))
    assert hf_tome.apply is hf_tome.integration.patch.apply
    assert hf_tome.AutoModelForImageClassification is hf_tome.integration.loading.AutoModelForImageClassification
    from hf_tome import ToMeConfig, unmerge

    assert ToMeConfig is hf_tome.config.ToMeConfig and unmerge is hf_tome.core.ops.unmerge
    assert hf_tome.core.schedule.__name__ == "hf_tome.core.schedule"  # submodules load on first use too
    with pytest.raises(AttributeError, match="module 'hf_tome' has no attribute 'no_such_name'"):
        hf_tome.no_such_name  # noqa: B018


def test_a_subcommand_without_its_extra_names_the_extra(monkeypatch, capsys):
    def missing(args):
        import hf_tome_no_such_dependency  # noqa: F401

    def missing_datasets(args):
        raise ModuleNotFoundError("No module named 'datasets'", name="datasets")

    monkeypatch.setattr(cli, "_run_search", missing_datasets)
    with pytest.raises(SystemExit) as exit:
        cli.main(["search"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("hf-tome search: needs the 'methods' extra (module 'datasets' is missing); "
                                       "expected it installed: pip install 'hf-tome[methods]'\n")
    monkeypatch.setattr(cli, "_run_bench", missing)
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench"])
    assert "pip install 'hf-tome[eval]'" in capsys.readouterr().err
