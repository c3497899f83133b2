# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The common parent of every error the core raises.

Every exception class defined in module_utils derives from :class:`BaileysResilienceError`
and keeps its own built-in base (``class BackupError(errors.BaileysResilienceError,
RuntimeError)``), so an existing ``except RuntimeError`` or ``except OSError`` still catches
what it caught, and a caller that wants "any failure of ours, not a bug elsewhere" can write
``except errors.BaileysResilienceError``.  Standard library only: every room can import it.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type


class BaileysResilienceError(Exception):
    """Any failure the core raises on purpose (a refused config, a failed backup, a bad file...).

    It carries no behaviour of its own: the message, and any ``result`` attribute a
    subclass attaches, stay the subclass's.  Catch it to tell our failures from bugs.
    """
