"""S3 replication benchmark against a baseline measured in the same run.

Starts a moto standalone server (its own process, on 127.0.0.1), writes
``--objects`` fake backups (random bytes + manifests per docs/backup-format.md)
totalling ``--size-mib``, then times:

  plain upload_file   boto3 ``upload_file`` of every dump and manifest, one after
                      the other, boto3's default TransferConfig (no hashing, no
                      HEAD, no verification) - the baseline
  replicate (cold)    s3.replicate into an empty bucket: local sha256 check,
                      upload (single part with a SHA256 checksum, or multipart),
                      HEAD verification of every object, manifests after dumps
  replicate (no-op)   s3.replicate again: nothing to upload
  replicate encrypted s3.replicate with an age recipient (issue 14), cold: every
                      backup sealed (its dump read once: hashed as it is
                      encrypted into .sealed/, the ciphertext hashed as it is
                      written; on one thread ahead of the uploads) then
                      uploaded and verified; the sealed copies are removed
                      before each run so none is reused (the issue's measure)
  replicate encrypted (encrypt_local)
                      s3.replicate, cold, of the same backups kept locally as
                      age ciphertext by the backup job (``encrypt_local: true``:
                      made once before the rounds with the backup job's
                      backupseal.encrypt_local_dump, whose time is printed):
                      uploaded as they are after their ciphertext hashed to
                      the manifest's encryption block; for information

Each cold measurement runs --repeat times into fresh buckets, alternating which
goes first; the best time is used and every time printed.  Targets: cold
replication throughput >= 0.9x the baseline's; no-op re-run < 2 s (for 60
objects); encrypted cold replication (sealing at replication time) >= 0.9x plain
cold replication.  moto keeps objects in memory (buckets are emptied between
runs).
Exits 0 whatever the verdicts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import _paths  # noqa: E402,F401 - sets sys.path for the imports below  # pylint: disable=unused-import

from support import s3fixtures  # noqa: E402

from ansible_collections.baileys.resilience.plugins.module_utils import (  # noqa: E402
    agecrypt, backup_format, backupseal, fsutil, s3)

MiB = 1024 * 1024


def log(msg):
    print("  .. %s" % msg, file=sys.stderr, flush=True)


def empty_bucket(client, bucket):
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend({"Key": o["Key"]} for o in page.get("Contents", []))
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000]})
    client.delete_bucket(Bucket=bucket)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="total size of the dumps (MiB)")
    ap.add_argument("--objects", type=int, default=60, help="number of backups (dump + manifest each)")
    ap.add_argument("--repeat", type=int, default=2, help="cold runs per measurement; the best is used")
    ap.add_argument("--multipart-threshold", default="64MiB", help="s3_replicate's multipart_threshold")
    ap.add_argument("--multipart-chunksize", default="16MiB", help="s3_replicate's multipart_chunksize")
    ap.add_argument("--max-concurrency", type=int, default=8, help="s3_replicate's max_concurrency")
    ap.add_argument("--data-dir", help="where to write the backups (default: a new temporary directory, removed "
                    "afterwards unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the data directory afterwards")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    load_before = os.getloadavg()
    for var, value in (("AWS_ACCESS_KEY_ID", s3fixtures.TEST_ACCESS_KEY),
                       ("AWS_SECRET_ACCESS_KEY", s3fixtures.TEST_SECRET_KEY), ("AWS_EC2_METADATA_DISABLED", "true")):
        os.environ[var] = value
    data = args.data_dir or tempfile.mkdtemp(prefix="baileys-bench-s3-")
    if os.path.exists(os.path.join(data, "backups")):
        shutil.rmtree(os.path.join(data, "backups"))
    backup_dir = os.path.join(data, "backups")
    os.makedirs(backup_dir, mode=0o700)
    size = args.size_mib * MiB // args.objects
    log("writing %d backups of %.1f MiB (%d MiB in all)" % (args.objects, size / MiB, size * args.objects // MiB))
    t0 = time.perf_counter()
    backups = [s3fixtures.make_backup(backup_dir, i, size=size) for i in range(args.objects)]
    log("written in %.1fs" % (time.perf_counter() - t0))
    total = sum(b["size"] + os.path.getsize(b["manifest_path"]) for b in backups)

    import pyrage  # noqa: E402 - only the encrypted measurements need it

    recipient = str(pyrage.x25519.Identity.generate().to_public())
    encryption = {"recipients": [recipient], "required": True}
    # encrypt_local: what the backup job does after validating a dump (backup._encrypt/_publish), on the same
    # dumps, into a directory of their own; the plaintext ones stay for the other measurements
    local_dir = os.path.join(data, "backups-encrypt-local")
    shutil.rmtree(local_dir, ignore_errors=True)
    os.makedirs(local_dir, mode=0o700)
    local_encryption = agecrypt.Encryption([recipient], required=True, encrypt_local=True)
    local_enc = {"wall": 0.0, "cpu": 0.0, "publish": 0.0}
    log("encrypt_local: encrypting the %d dumps as the backup job does" % args.objects)
    for b in backups:
        dest = os.path.join(local_dir, b["name"])
        partial = dest + backup_format.ENCRYPTING_SUFFIX
        manifest = dict(b["manifest"])
        t0, c0 = time.perf_counter(), time.process_time()
        manifest["encryption"] = backupseal.encrypt_local_dump(b["path"], partial, manifest, local_encryption)
        local_enc["wall"] += time.perf_counter() - t0
        local_enc["cpu"] += time.process_time() - c0
        t0 = time.perf_counter()
        os.rename(partial, dest)
        fsutil.fsync_dir(local_dir)
        fsutil.atomic_write(dest + ".manifest.json", backup_format.manifest_bytes(manifest), mode=0o600)
        local_enc["publish"] += time.perf_counter() - t0
    local_total = sum(os.path.getsize(os.path.join(local_dir, n)) for n in os.listdir(local_dir))
    log("encrypt_local_dump: %.2fs (%.2f CPU-s), publishing %.2fs" % (
        local_enc["wall"], local_enc["cpu"], local_enc["publish"]))

    server = s3fixtures.MotoServer(log_path=os.path.join(data, "moto.log")).start()
    log("moto_server on port %d" % server.port)
    client = s3fixtures.s3_client(server.url, "eu-west-1")
    settings = s3.Settings(multipart_threshold=args.multipart_threshold,
                           multipart_chunksize=args.multipart_chunksize, max_concurrency=args.max_concurrency)
    target = dict(name="bench", region="eu-west-1", endpoint_url=server.url, prefix="bench/")
    local_label = "replicate encrypted (encrypt_local)"
    results = {"plain upload_file": [], "replicate (cold)": [], "replicate (no-op)": [],
               "replicate encrypted": [], local_label: []}
    removal = []  # the part of each "replicate encrypted" run that removed the previous round's sealed copies
    try:
        def plain(bucket):
            for b in backups:
                for path in (b["path"], b["manifest_path"]):
                    client.upload_file(path, bucket, "bench/" + os.path.basename(path))

        def encrypted(bucket):
            t0 = time.perf_counter()  # timed with the run, as it always was; its share is printed apart
            shutil.rmtree(os.path.join(backup_dir, ".sealed"), ignore_errors=True)
            removal.append(time.perf_counter() - t0)
            res = s3.replicate(backup_dir, [dict(target, bucket=bucket)], settings, encryption=encryption)
            if not res["ok"] or res["uploaded"] != 2 * args.objects:
                raise SystemExit("encrypted replication failed: %s" % s3.failure_message(res))
            return res

        def encrypted_local(bucket):
            res = s3.replicate(local_dir, [dict(target, bucket=bucket)], settings,
                               encryption=dict(encryption, encrypt_local=True))
            if not res["ok"] or res["uploaded"] != 2 * args.objects:
                raise SystemExit("replication of the encrypt_local backups failed: %s (%s)" % (
                    s3.failure_message(res), res["invalid_local"]))
            return res

        def ours(bucket):
            res = s3.replicate(backup_dir, [dict(target, bucket=bucket)], settings)
            if not res["ok"] or res["uploaded"] != 2 * args.objects:
                raise SystemExit("replication failed: %s" % s3.failure_message(res))
            return res

        for i in range(args.repeat):
            order = [("plain upload_file", plain), ("replicate (cold)", ours), ("replicate encrypted", encrypted),
                     (local_label, encrypted_local)]
            if i % 2:
                order.reverse()
            for label, fn in order:
                bucket = s3fixtures.create_bucket(server.url, "eu-west-1", "bench-%d-%s" % (
                    i, {plain: "plain", ours: "ours", encrypted: "enc"}.get(fn, "enc-local")))
                t0 = time.perf_counter()
                fn(bucket)
                wall = time.perf_counter() - t0
                results[label].append(wall)
                log("%-18s run %d: %.2fs (%.0f MiB/s)" % (label, i + 1, wall, total / MiB / wall))
                if fn is ours and i == args.repeat - 1:
                    for j in range(3):
                        t0 = time.perf_counter()
                        res = s3.replicate(backup_dir, [dict(target, bucket=bucket)], settings)
                        wall = time.perf_counter() - t0
                        assert res["ok"] and not res["changed"], res
                        results["replicate (no-op)"].append(wall)
                        log("%-18s run %d: %.3fs" % ("replicate (no-op)", j + 1, wall))
                empty_bucket(client, bucket)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)

    best = {k: min(v) for k, v in results.items()}
    print()
    print("baileys.resilience S3 benchmark  %s" % datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    print("data: %d backups x %.1f MiB = %.0f MiB (+ manifests); moto_server %s on 127.0.0.1; %s, %d CPUs, "
          "Python %s; best of %d" % (args.objects, size / MiB, total / MiB, s3fixtures_version(), platform.machine(),
                                     os.cpu_count(), platform.python_version(), args.repeat))
    print("s3_replicate: multipart_threshold %s, multipart_chunksize %s, max_concurrency %d; baseline: boto3 "
          "defaults (8 MiB threshold/chunks, 10 threads)" % (args.multipart_threshold, args.multipart_chunksize,
                                                             args.max_concurrency))
    print("encryption engine: %s; load average (1/5/15 min) at the start %s, at the end %s" % (
        encryption_engine(), "/".join("%.2f" % x for x in load_before),
        "/".join("%.2f" % x for x in os.getloadavg())))
    print()
    print("%-36s %9s %9s   %s" % ("measurement", "best s", "MiB/s", "all runs (s)"))
    for label, runs in results.items():
        rate = total / MiB / best[label] if "no-op" not in label else 0
        print("%-36s %9.3f %9.0f   %s" % (label, best[label], rate, " ".join("%.3f" % r for r in runs)))
    print("(MiB/s: of the plaintext dumps and manifests, %.0f MiB; the encrypt_local ciphertext and manifests are "
          "%.1f MiB)" % (total / MiB, local_total / MiB))
    ratio = best["plain upload_file"] / best["replicate (cold)"]
    noop_limit = 2.0 * args.objects / 60
    print()
    print("%-40s %9s  %-9s %s" % ("target", "measured", "wanted", "verdict"))
    print("%-40s %8.2fx  %-9s %s" % ("replicate throughput vs plain upload_file", ratio, ">= 0.90x",
                                     "PASS" if ratio >= 0.9 else "FAIL"))
    enc_ratio = best["replicate (cold)"] / best["replicate encrypted"]
    print("%-40s %8.2fx  %-9s %s" % ("encrypted vs plain replicate (cold)", enc_ratio, ">= 0.90x",
                                     "PASS" if enc_ratio >= 0.9 else "FAIL"))
    print("  (each 'replicate encrypted' run includes the removal of the previous round's sealed copies: %s s; "
          "without it the best is %.3f s, %.2fx: for information, the verdict above counts it)" % (
              " ".join("%.3f" % r for r in removal),
              min(e - r for e, r in zip(results["replicate encrypted"], removal)),
              best["replicate (cold)"] / min(e - r for e, r in zip(results["replicate encrypted"], removal))))
    local_ratio = best["replicate (cold)"] / best[local_label]
    with_job = best[local_label] + local_enc["wall"]
    print("%-40s %8.2fx  %-9s %s" % ("encrypt_local vs plain replicate (cold)", local_ratio, "(info)", "-"))
    print("  (the backups were encrypted by the backup job beforehand: encrypt_local_dump of the %d dumps took "
          "%.3f s, %.2f CPU-s, %.0f MiB/s; publishing them %.3f s; the two one after the other: %.3f s, %.2fx "
          "plain cold replicate)" % (args.objects, local_enc["wall"], local_enc["cpu"],
                                     size * args.objects / MiB / local_enc["wall"], local_enc["publish"], with_job,
                                     best["replicate (cold)"] / with_job))
    print("%-40s %8.2fs  %-9s %s" % ("no-op re-run (%d objects)" % args.objects, best["replicate (no-op)"],
                                     "< %.2fs" % noop_limit, "PASS" if best["replicate (no-op)"] < noop_limit
                                     else "FAIL"))
    print()
    print("total benchmark time %.0fs" % (time.perf_counter() - started))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "best": best, "ratio": ratio, "encrypted_ratio": enc_ratio, "bytes": total,
                       "encrypted_removal": removal, "encrypt_local_ratio": local_ratio,
                       "encrypt_local_dump": local_enc, "encrypt_local_bytes": local_total,
                       "args": vars(args)}, fh,
                      indent=1)
    return 0


def encryption_engine():
    from importlib.metadata import version

    return "pyrage %s" % version("pyrage")


def s3fixtures_version():
    try:
        from importlib.metadata import version

        return version("moto")
    except Exception:  # noqa: BLE001 - informational only
        return "?"


if __name__ == "__main__":
    sys.exit(main())
