"""The label half of a compact set (stage teacher): the teacher's logits, top-k quantised soft labels."""
