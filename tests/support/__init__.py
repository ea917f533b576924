"""Test support, imported by the tests as `support.<module>` (pytest puts tests/ on the path
for its conftest); split by what each part is: fakes, database, processes."""
