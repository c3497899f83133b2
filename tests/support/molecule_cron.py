"""Helpers for molecule verifiers (testinfra, run on the controller) shared by the scenarios."""

import re
import shlex


def run(host, cmd, ok=True):
    """``host.run`` that fails the test with the output when ``ok`` and the command failed."""
    result = host.run(cmd)
    if ok:
        assert result.rc == 0, "%s\nrc=%s\nstdout:\n%s\nstderr:\n%s" % (cmd, result.rc, result.stdout, result.stderr)
    return result


def cron_job(host, cron_file, name):
    """``(environment, schedule, user, command)`` of the job ``#Ansible: <name>`` in a cron.d file."""
    lines = host.file(cron_file).content_string.splitlines()
    env = {}
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2).strip().strip('"')
        if line.strip() == "#Ansible: %s" % name:
            fields = lines[i + 1].split(None, 6)
            assert len(fields) == 7, lines[i + 1]
            return env, " ".join(fields[:5]), fields[5], fields[6]
    raise AssertionError("no job %r in %s:\n%s" % (name, cron_file, "\n".join(lines)))


def run_like_cron(host, cron_file, name):
    """Run a job's command exactly as cron does: ``/bin/sh -c`` as root, with cron's small environment."""
    env, _schedule, user, command = cron_job(host, cron_file, name)
    assert user == "root"
    cron_env = {"HOME": "/root", "LOGNAME": "root", "USER": "root", "SHELL": "/bin/sh",
                "PATH": env.get("PATH", "/usr/bin:/bin")}
    cron_env.update({k: v for k, v in env.items() if k != "PATH"})
    assigns = " ".join("%s=%s" % (k, shlex.quote(v)) for k, v in sorted(cron_env.items()))
    return host.run("env -i %s /bin/sh -c %s" % (assigns, shlex.quote(command))), command


def run_backup_job(host, backup_dir, cron_file, log="/var/log/baileys-resilience/backup.log"):
    """Empty ``backup_dir`` and the backup log, then run the daily backup job exactly as cron would."""
    run(host, "find %s -mindepth 1 -delete && rm -f %s" % (backup_dir, log))
    result, command = run_like_cron(host, cron_file, "baileys-resilience backup")
    print("ran as cron: /bin/sh -c %r -> rc %d" % (command, result.rc))
    return result
