"""Stand-in for the get-pip.py that ansible-test downloads to bootstrap pip into its sanity venvs.

ansible-test fetches get-pip.py from a host this project cannot reach, and accepts a copy
saved at ~/.ansible/test/cache/get_pip_<version>.py instead (`make sanity` puts this file
there). It does the same job with what Python ships: ensurepip, then pip installs the
requested pip pin from PyPI.
"""

from __future__ import annotations

import subprocess
import sys

# get-pip.py's own flags; pip install does not know them, and installs neither package unasked
GET_PIP_ONLY = ('--no-setuptools', '--no-wheel')


def main() -> int:
    """Install pip into the running interpreter, then the packages given on the command line."""
    args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY]
    subprocess.run([sys.executable, '-m', 'ensurepip', '--default-pip'], check=True, stdout=subprocess.DEVNULL)
    return subprocess.run([sys.executable, '-m', 'pip', 'install', '--upgrade', *args], check=False).returncode


if __name__ == '__main__':
    sys.exit(main())
