# -*- coding: utf-8 -*-
# Copyright: baileys.resilience contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # PostgreSQL connection options, as in community.postgresql.
    DOCUMENTATION = r"""
options:
  login_host:
    description:
      - Host running PostgreSQL. Unset means libpq's default (C(PGHOST), then the local socket).
    type: str
    aliases: [host, login_hostname]
  login_port:
    description:
      - Port. Unset means libpq's default (C(PGPORT), then 5432).
    type: int
    aliases: [port]
  login_user:
    description:
      - Role to connect as. Unset means libpq's default (C(PGUSER), then the OS user).
    type: str
    aliases: [login, user]
  login_password:
    description:
      - Password. Passed to libpq as a separate parameter, never on a command line or in a log,
        so any character works.
      - Unset means libpq's own sources, C(PGPASSWORD), C(PGPASSFILE) or C(~/.pgpass).
    type: str
    aliases: [password]
  login_db:
    description:
      - Database holding the auth state. Unset means libpq's default (C(PGDATABASE), then the user name).
    type: str
    aliases: [db, database]
  login_unix_socket:
    description:
      - Directory of the server's unix socket; wins over O(login_host).
    type: str
    aliases: [unix_socket]
  ssl_mode:
    description:
      - libpq C(sslmode). Unset means libpq's default (C(PGSSLMODE), then C(prefer)).
    type: str
    choices: [allow, disable, prefer, require, verify-ca, verify-full]
  ca_cert:
    description:
      - CA certificate file to verify the server with (libpq C(sslrootcert)).
    type: str
    aliases: [ssl_rootcert]
  connect_timeout:
    description:
      - Seconds to wait for the connection.
    type: int
    default: 10
  connect_params:
    description:
      - Any other libpq connection parameters, for example C(sslcert) or C(target_session_attrs).
      - They win over the options above.
    type: dict
    default: {}
requirements:
  - psycopg (version 3) or psycopg2 on the host that runs the module (Debian C(python3-psycopg) or
    C(python3-psycopg2)); psycopg 3 is used when both are installed.
notes:
  - libpq environment variables (C(PGHOST), C(PGPASSFILE), C(PGSERVICE)...) and passfiles apply
    to every option left unset.
"""
