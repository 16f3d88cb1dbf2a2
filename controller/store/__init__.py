"""The controller's durable state behind one interface (SQLite now, etcd later)."""
