"""Verify of the s3_replication scenario, part 1: what converge laid down (cron lines, secrets, buckets)."""

import pytest
import yaml
from scenario import (ACCESS_KEY, APP, BACKUP_CRON, BACKUP_DIR, CONFIG_DIR, CREDENTIALS_DIR, RECIPIENT, S3_CRON,
                      SECRET_KEY, TARGETS, TOOL, cron_job, s3_client)

testinfra_hosts = [APP]


def test_backup_cron_line(host):
    env, schedule, user, command = cron_job(host, BACKUP_CRON, "baileys-resilience backup")
    assert user == "root" and schedule == "0 3 * * *"
    assert command == "%s backup >> /var/log/baileys-resilience/backup.log 2>&1" % TOOL
    assert "/usr/local/bin" in env["PATH"].split(":")


def test_s3_catch_up_cron_line(host):
    env, schedule, user, command = cron_job(host, S3_CRON, "baileys-resilience replicate")
    assert user == "root" and schedule == "45 */6 * * *"
    assert command == "%s replicate >> /var/log/baileys-resilience/replicate.log 2>&1" % TOOL
    assert "/usr/local/bin" in env["PATH"].split(":")
    f = host.file(S3_CRON)
    assert f.user == "root" and f.mode & 0o022 == 0


def test_credentials_files(host):
    d = host.file(CREDENTIALS_DIR)
    assert d.is_directory and d.user == "root" and d.group == "root" and d.mode == 0o700, oct(d.mode)
    for t in TARGETS:
        f = host.file("%s/%s.credentials" % (CREDENTIALS_DIR, t["name"]))
        assert f.is_file and f.user == "root" and f.group == "root" and f.mode == 0o600, (t["name"], oct(f.mode))
        content = f.content_string
        assert "aws_access_key_id = %s" % ACCESS_KEY in content
        assert "aws_secret_access_key = %s" % SECRET_KEY in content


def test_config_fragment_has_no_secret(host):
    f = host.file("%s/config.d/s3_replication.yml" % CONFIG_DIR)
    assert f.user == "root" and f.mode == 0o600, oct(f.mode)
    text = f.content_string
    assert SECRET_KEY not in text and ACCESS_KEY not in text
    assert "secret" not in text.lower() and "access_key" not in text
    cfg = yaml.safe_load(text)["s3"]
    assert [t["name"] for t in cfg["targets"]] == [t["name"] for t in TARGETS]
    for t, want in zip(cfg["targets"], TARGETS):
        assert t["bucket"] == want["bucket"] and t["region"] == want["region"]
        assert t["credentials_file"] == "%s/%s.credentials" % (CREDENTIALS_DIR, want["name"])
        assert set(t) <= {"name", "bucket", "region", "endpoint_url", "prefix", "credentials_file"}, t
    assert cfg["after_backup"] is True


def test_tool_has_boto3_and_pyrage(host):
    # the command's own venv (cli role: cli_install_s3 and cli_install_encryption from the s3_replication settings)
    python = host.file(TOOL).content_string.splitlines()[0][2:].split()[0]
    assert python == "/opt/baileys-resilience/venv/bin/python", python
    assert host.run("%s -I -c 'import boto3, pyrage'" % python).rc == 0


def test_encryption_configured_and_no_identity_on_the_host(host):
    cfg = yaml.safe_load(host.file("%s/config.d/s3_replication.yml" % CONFIG_DIR).content_string)["s3"]
    assert cfg["encryption"] == {"recipients": [RECIPIENT], "required": True, "encrypt_local": False}, cfg["encryption"]
    # identities (private keys) never go on the backup host: none in its config, install or backup directories
    found = host.run("grep -rIlE 'AGE-SECRET-KEY-1[0-9A-Z]{58}' %s /opt/baileys-resilience %s /root || true"
                     % (CONFIG_DIR, BACKUP_DIR))
    assert found.stdout.strip() == "", found.stdout


@pytest.mark.parametrize("target", [t for t in TARGETS if t["configured"]], ids=lambda t: t["name"])
def test_configured_bucket_versioning_and_lifecycle(target):
    client = s3_client(target["region"])
    assert client.get_bucket_versioning(Bucket=target["bucket"]).get("Status") == "Enabled"
    location = client.get_bucket_location(Bucket=target["bucket"]).get("LocationConstraint")
    assert location == target["region"]
    rules = {r["ID"]: r for r in client.get_bucket_lifecycle_configuration(Bucket=target["bucket"])["Rules"]}
    assert set(rules) == {"baileys-resilience-daily", "baileys-resilience-monthly"}, rules

    def prefix(rule):
        return rule.get("Filter", {}).get("Prefix", rule.get("Prefix"))

    daily, monthly = rules["baileys-resilience-daily"], rules["baileys-resilience-monthly"]
    assert daily["Status"] == "Enabled" and monthly["Status"] == "Enabled"
    assert prefix(daily) == target["prefix"] + "daily/"
    assert daily["Expiration"]["Days"] == 30
    assert daily["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 7
    assert prefix(monthly) == target["prefix"] + "monthly/"
    assert monthly["Expiration"]["Days"] == 365
    assert [(t["Days"], t["StorageClass"]) for t in monthly["Transitions"]] == [(30, "GLACIER")]


@pytest.mark.parametrize("target", [t for t in TARGETS if not t["configured"]], ids=lambda t: t["name"])
def test_unconfigured_bucket_left_alone(target):
    client = s3_client(target["region"])
    assert client.get_bucket_versioning(Bucket=target["bucket"]).get("Status") is None
