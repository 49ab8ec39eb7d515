"""The benchmarks' A/B settings (bench/pdl_auto.py SETTINGS, bench/quant_engine.py VARIANTS' kernel overrides) on
the CPU: each names settings that exist, puts the values it asks for in force in the module whose launchers read
them, and restores everything after. Device time is scarce: a misspelt setting must fail here, not after a build
on the GPU."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from bench import pdl_auto, quant_engine
from runtime.ops import pdl


def _assigned(module: str) -> set[str]:
    """The names a runtime.ops module assigns at its top level (not those it imports)."""
    src = importlib.import_module(f"runtime.ops.{module}").__loader__.get_source(f"runtime.ops.{module}")
    out = set()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return out


def _owner(name: str):
    """The module whose launchers read the setting: "module.NAME", or for a bare NAME the GEMM module that
    assigns it (found from the source, independently of kernel_overrides' own lookup)."""
    module, _, attr = name.rpartition(".")
    if not module:
        owners = [m for m in quant_engine.GEMM_MODULES if attr in _assigned(m)]
        assert len(owners) == 1, f"{name}: assigned by {owners or 'no GEMM module'}"
        module = owners[0]
    return importlib.import_module(f"runtime.ops.{module}"), attr


def _snapshot(names) -> dict:
    return {n: getattr(*_owner(n)) for n in names}


@pytest.mark.parametrize("setting", sorted(pdl_auto.SETTINGS))
def test_pdl_auto_setting_applies_and_restores(setting):
    max_batch, enabled, kernels = pdl_auto.SETTINGS[setting]
    variant = "w4a16-mma+lm"
    names = {**quant_engine.VARIANTS[variant].get("kernels", {}), **kernels}
    before, reach = _snapshot(names), (pdl.AUTO_MAX_BATCH, pdl.ENABLED)
    with pdl_auto.applied(variant, setting):
        for name, want in names.items():
            got = getattr(*_owner(name))
            if isinstance(want, dict):
                assert got == dataclasses.replace(before[name], **want), name
            else:
                assert got == want, name
        assert pdl.ENABLED == enabled and pdl.AUTO_MAX_BATCH == (reach[0] if max_batch is None else max_batch)
    assert _snapshot(names) == before and (pdl.AUTO_MAX_BATCH, pdl.ENABLED) == reach


@pytest.mark.parametrize("variant", sorted(quant_engine.VARIANTS))
def test_quant_engine_variant_overrides_exist(variant):
    names = quant_engine.VARIANTS[variant].get("kernels", {})
    before = _snapshot(names)
    with quant_engine.kernel_overrides(names):
        for name, want in names.items():
            got = getattr(*_owner(name))
            assert got == (dataclasses.replace(before[name], **want) if isinstance(want, dict) else want), name
    assert _snapshot(names) == before


def test_device_session_steps_name_builds_and_settings_that_exist():
    """bench/device_session.sh, the next GPU session's steps: every build its pdl_auto / profile_decode calls name is a
    quant_engine variant and every --plan setting a pdl_auto setting (a misspelt one would cost a GPU build)."""
    script = (Path(pdl_auto.__file__).parent / "device_session.sh").read_text()
    w = re.search(r"^W=(\S+)$", script, re.M).group(1)
    script = script.replace("$W", w)
    variants = [v for arg in re.findall(r'--variants "?([^"\s]+)"?', script) for v in arg.split(",")]
    plans = re.findall(r'--plan "?([^"\s]+)"?', script)
    assert variants and plans, "device_session.sh runs no pdl_auto plan"
    for v in variants + re.findall(r'--variant "?([^"\s]+)"?', script):
        assert v in quant_engine.VARIANTS, v
    for plan in plans:
        variant, _, settings = plan.partition("=")
        assert variant in variants, plan
        assert all(s in pdl_auto.SETTINGS for s in settings.split(",")), plan
