"""Pieces shared by the trainers and engines of this distribution."""
