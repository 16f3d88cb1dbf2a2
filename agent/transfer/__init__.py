"""Host-to-host file transfer for migrations: rsync over the agent's own SSH endpoint, and
checkpoint images as one stream of files.

- keys.py           operation key pairs, the host's transfer key
- grants.py         per-operation receive grants (user, key, staging dir, deadline)
- rsync_command.py  what a grant may exec: our client's `rsync --server`, or the file receiver
- server.py         the asyncssh endpoint on the destination
- client.py         `rsync_push` on the source (OpenSSH client as rsync's transport)
- file_stream.py    a flat directory as one stream (pieces while CRIU writes, zstd frames)
- stream_push.py    that stream over the source agent's own SSH connection
- tls_stream.py     that stream over a per-operation TLS endpoint (faster for memory)
"""
