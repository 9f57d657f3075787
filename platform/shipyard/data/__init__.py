"""Stage 1, data: reading tables (CSV, parquet) into reproducible Ray Dataset splits and describing them."""
