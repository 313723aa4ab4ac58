"""Dataset intake: parsing, validation and fetching of user training data."""
