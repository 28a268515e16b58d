"""The HTTP process must never load torch, diffusers or transformers."""

import subprocess
import sys


def test_app_imports_no_torch() -> None:
    code = (
        "import sys, app.main, app.serving, app.routes.generations, latentd.cli, latentd.client;"
        "app.main.create_app();"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"app imported {out.stdout.strip()}"


def test_contract_imports_neither_side() -> None:
    code = (
        "import sys, latentd.contract;"
        "bad = [m for m in ('torch', 'diffusers', 'fastapi', 'app', 'worker') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
