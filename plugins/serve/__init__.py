"""``specprof serve``: the results store as a local, read-only web app (pages, JSON, SQL)."""
