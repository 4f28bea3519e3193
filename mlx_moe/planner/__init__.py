"""`mlx-moe plan`: where a checkpoint's bytes go and how fast decode will
be, from its headers, a cost model and chip/link profiles (profiles.json)."""
