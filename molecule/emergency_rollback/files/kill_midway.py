"""Start a failover playbook and SIGKILL its whole process tree in the middle of the handover.

    kill_midway.py PLAYBOOK CONTAINER STATE_FILE MODE [DELAY]

Runs ``ansible-playbook -i $MOLECULE_EPHEMERAL_DIRECTORY/inventory PLAYBOOK`` in a new session, polls the
failover state file in CONTAINER (``podman exec``) until it says MODE (``switching-to-files`` or
``switching-to-postgres``: the service is being stopped or the state handed over), waits DELAY seconds
(default 0.5) and kills the session's process group with SIGKILL, as an operator's lost SSH session or an
OOM kill would. Prints a JSON line; exits 1 when the playbook ended before it could be killed (then the
test did not test what it names).
"""
import json
import os
import signal
import subprocess
import sys
import time


def mode_in(container, path):
    out = subprocess.run(["podman", "exec", container, "cat", path], capture_output=True, text=True, check=False)
    try:
        return json.loads(out.stdout).get("mode")
    except ValueError:
        return None


def main():
    playbook, container, path, want = sys.argv[1:5]
    delay = float(sys.argv[5]) if len(sys.argv) > 5 else 0.5
    inventory = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "inventory")
    log = open(os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "kill-%s.log" % want), "w")
    started = time.monotonic()
    proc = subprocess.Popen(["ansible-playbook", "-i", inventory, playbook], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen = None
    while time.monotonic() - started < 180:
        if proc.poll() is not None:
            break
        seen = mode_in(container, path)
        if seen == want:
            time.sleep(delay)
            break
        time.sleep(0.1)
    ended_before = proc.poll() is not None
    if not ended_before:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(json.dumps({"killed": not ended_before, "mode_seen": seen,
                      "after_seconds": round(time.monotonic() - started, 2), "mode_after": mode_in(container, path)}))
    return 1 if ended_before else 0


if __name__ == "__main__":
    sys.exit(main())
