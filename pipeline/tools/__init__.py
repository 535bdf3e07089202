"""What users run around the stages: code statistics, queries and decoding over the code
tables, and weight converters (LPIPS)."""
