"""Reading and writing images and landmark files; the only place voxels and world coordinates meet."""
from spinelm.io.files import atomic_path, read_json, write_json_atomic, write_text_atomic
from spinelm.io.image import (CANONICAL_ORIENTATION, IMAGE_ENDINGS, Geometry, ImageReadError, image_ending,
                              load_volume, make_image, read_geometry, read_image, to_canonical, write_image)
from spinelm.io.landmarks import (Landmark, centroids_from_mask, read_landmarks, write_slicer_markups,
                                  write_spinelm_json, write_verse_json)

__all__ = ["atomic_path", "read_json", "write_json_atomic", "write_text_atomic", "CANONICAL_ORIENTATION",
           "IMAGE_ENDINGS", "Geometry", "ImageReadError", "image_ending", "load_volume", "make_image",
           "read_geometry", "read_image", "to_canonical", "write_image", "Landmark", "centroids_from_mask",
           "read_landmarks", "write_slicer_markups", "write_spinelm_json", "write_verse_json"]
