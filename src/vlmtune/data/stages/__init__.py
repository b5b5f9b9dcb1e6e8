"""The steps one sample goes through: validate → encode → fit (a preference pair as one unit: pairs), then at
training time pack and collate (with the guard). The rows they emit are declared in data/schema.py."""
