"""The store: SQLAlchemy Core schema, Alembic migrations, and the data-access class that seals what it writes."""
