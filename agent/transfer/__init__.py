"""Host-to-host file transfer for migrations: rsync over the agent's own SSH endpoint.

- keys.py           operation key pairs, the host's transfer key
- grants.py         per-operation receive grants (user, key, staging dir, deadline)
- rsync_command.py  the only command a grant may exec: our client's `rsync --server`
- server.py         the asyncssh endpoint on the destination
- client.py         `rsync_push` on the source (OpenSSH client as rsync's transport)
"""
