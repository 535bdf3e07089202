"""Data at rest and its conversions: the code tables, the shard tars, and images between file
bytes, pixels, model tensors and PNG grids."""
