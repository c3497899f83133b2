"""Pack the collection's module_utils sources as the host command's package: one zip, byte for byte the same
for the same sources (sorted names, fixed times and modes), so the copy to the host is one transfer and
changes only when a source changed.

    python3 pack_package.py MODULE_UTILS_DIR OUT.zip

The zip holds ``baileys_resilience/__init__.py`` and ``baileys_resilience/<room>.py`` for every ``*.py`` of
MODULE_UTILS_DIR (no byte-code); Python imports the package straight from it (zipimport), the launcher puts the
zip on ``sys.path``.
"""
import os
import sys
import zipfile

INIT = b"# baileys.resilience host command (managed by Ansible): the collection's module_utils\n"


def pack(source_dir, out_path):
    names = sorted(n for n in os.listdir(source_dir) if n.endswith(".py") and n != "__init__.py")
    tmp = out_path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in [("__init__.py", INIT)] + [(n, None) for n in names]:
            if data is None:
                with open(os.path.join(source_dir, name), "rb") as fh:
                    data = fh.read()
            info = zipfile.ZipInfo("baileys_resilience/" + name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            info.create_system = 3
            zf.writestr(info, data, compresslevel=9)
    os.replace(tmp, out_path)
    return names


if __name__ == "__main__":
    pack(sys.argv[1], sys.argv[2])
