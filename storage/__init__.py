"""The only package that speaks SQL: schema, migrations and queries over sqlite-utils."""
