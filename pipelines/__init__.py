"""Driver pipelines: thin wiring over `shipyard`; configs under pipelines/configs/."""
