"""Every module's DOCUMENTATION, EXAMPLES and RETURN parse, and ansible-doc renders each module
(a colon in a plain YAML scalar silently drops a module's documentation otherwise)."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest
import yaml

from support import ROOT


MODULES = sorted(glob.glob(os.path.join(ROOT, "plugins", "modules", "*.py")))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: os.path.basename(p)[:-3])
def test_module_documentation_parses(path, ansible_env):
    src = open(path).read()
    for name in ("DOCUMENTATION", "EXAMPLES", "RETURN"):
        m = re.search(name + r' = r"""(.*?)"""', src, re.S)
        assert m, "%s has no %s" % (path, name)
        yaml.safe_load(m.group(1))
    module = "baileys.resilience." + os.path.basename(path)[:-3]
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-doc"), module],
                          capture_output=True, text=True, env=ansible_env, check=False)
    assert proc.returncode == 0 and "ERROR" not in proc.stderr, proc.stderr[-2000:]
