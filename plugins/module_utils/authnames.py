# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The names every auth-state room shares (see authstate.py for the map of the rooms).

* the errors: :class:`AuthStateError` (an error an operator can act on; the other rooms'
  errors derive from it) and :class:`InvalidCompanyId`;
* company ids and directory names: :func:`check_company_id` (an id that could leave the
  destination or hide as a dot file is refused), :func:`display_name`, :class:`DirTemplate`
  (``company_dir``, a template with exactly one ``{company_id}``);
* the options both directions parse: :func:`resolve_owner`, :func:`parse_mode`;
* Baileys key file names read back as ``(key_type, key_id)`` with one regex match
  (:func:`_parse_key_name`: what an export checks its names against, what an import reads);
* ``_sha``, the sha256 that manifests and guards record, and two settings both directions
  use: ``DIFF_LIMIT`` and ``READ_PROCESSES``.

Standard library and baileys_codec only: it imports no other auth-state room, so any of
them can import it.  No Ansible import.
"""
from __future__ import absolute_import, division, print_function

import grp
import hashlib
import os
import pwd
import re

from . import baileys_codec as codec
from . import errors

__metaclass__ = type

DIFF_LIMIT = 2000  # file names listed per company in diff output
DEFAULT_COMPANY_DIR = "{company_id}"  # the directory name template of the export and the import
DEFAULT_FILE_MODE = "0600"  # of exported files
DEFAULT_DIRECTORY_MODE = "0700"  # of exported company directories
DEFAULT_BUFFER_ENCODING = "base64"  # how the import writes Buffers (docs: buffer_encoding)
# Worker processes of an export's directory checks and of an import's fast reader (their reads
# also overlap on a cold cache).  authexport and authimport read it as authnames.READ_PROCESSES
# when they run, so a value set here reaches both.
READ_PROCESSES = min(4, max(2, os.cpu_count() or 1))


class AuthStateError(errors.BaileysResilienceError, RuntimeError):
    """An error an operator can act on; the message says what and where."""


class InvalidCompanyId(AuthStateError):
    """A company id that cannot name a directory; an export reports it and goes on with the others."""


# --------------------------------------------------------------------------- names


def check_company_id(company_id):
    """Refuse ids that could leave ``dest`` or hide as dot files."""
    if not isinstance(company_id, str) or not company_id:
        raise InvalidCompanyId("invalid company id %r: empty" % (company_id,))
    try:
        company_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidCompanyId("refusing company id %s: not valid UTF-8" % display_name(company_id))
    bad = [c for c in ("/", "\\", "\x00") if c in company_id]
    if bad or ".." in company_id or company_id.startswith(".") or len(company_id.encode("utf-8", "replace")) > 200:
        raise InvalidCompanyId(
            "refusing company id %r: it must not contain '/', '\\', NUL or '..', start with '.', "
            "or be longer than 200 bytes" % (company_id,)
        )
    return company_id


def display_name(name):
    """``name`` (a str from the file system, perhaps with undecodable bytes) as printable text."""
    return os.fsencode(name).decode("utf-8", "backslashreplace") if isinstance(name, str) else repr(name)


class DirTemplate:
    """``company_dir``: a template with exactly one ``{company_id}``."""

    def __init__(self, template):
        if template.count("{company_id}") != 1 or "/" in template or template.startswith("."):
            raise AuthStateError(
                "company_dir %r must contain '{company_id}' exactly once, no '/', and not start with '.'" % (template,)
            )
        self.template = template
        prefix, suffix = template.split("{company_id}")
        self._re = re.compile("^%s(.+)%s$" % (re.escape(prefix), re.escape(suffix)), re.S)

    def name(self, company_id):
        return self.template.replace("{company_id}", check_company_id(company_id))

    def company(self, dir_name):
        m = self._re.match(dir_name)
        return m.group(1) if m else None


def resolve_owner(owner=None, group=None):
    uid = gid = -1
    if owner not in (None, ""):
        try:
            uid = int(owner) if str(owner).isdigit() else pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise AuthStateError("owner %r does not exist" % (owner,))
    if group not in (None, ""):
        try:
            gid = int(group) if str(group).isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise AuthStateError("group %r does not exist" % (group,))
    return uid, gid


def parse_mode(mode, default):
    if mode in (None, ""):
        return default
    if isinstance(mode, int):
        return mode
    text = str(mode)
    if not re.match(r"^0?[0-7]{3,4}$", text):
        raise AuthStateError("mode %r must be octal, like '0600'" % (mode,))
    return int(text, 8)


def _sha(data):
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- key file names


_KEY_NAME = re.compile(r"(%s)-(.+)\.json\Z" % "|".join(re.escape(t) for t in codec._TYPES_LONGEST_FIRST), re.S)


def _parse_key_name(name):
    """codec.parse_key_file_name, with one regex match instead of a loop over the key types."""
    m = _KEY_NAME.match(name)
    if m is None:
        return codec.parse_key_file_name(name)  # raises CodecError
    key_type, key_id = m.groups()
    if key_type == "sender-key":
        key_id = key_id.replace("--", "::")
    elif key_type == "app-state-sync-key":
        key_id = key_id.replace("__", "/")
    return key_type, key_id
