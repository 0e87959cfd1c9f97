"""The wheel's build hook: with HATCH_BUILD_HOOK_ENABLE_CUSTOM=true, the
wheel carries the guard's identity core compiled by mypyc, built by
scripts/build-compiled (see docs/guard.md). Off by default: editable
installs and plain wheels stay pure Python."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CompiledCoreHook(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        self._temp = Path(tempfile.mkdtemp(prefix="tether-compiled-"))
        out = self._temp / "compiled"
        script = Path(self.root) / "scripts" / "build-compiled"
        # The project's own script, run by the build's interpreter (S603).
        subprocess.run([sys.executable, str(script), str(out)], check=True)  # noqa: S603
        for extension in sorted(out.rglob("*.so")):
            build_data["force_include"][str(extension)] = str(extension.relative_to(out))
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        temp = getattr(self, "_temp", None)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
