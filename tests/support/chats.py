"""Chat messages in the processor's format (`{"type": "video"}` / `{"type": "image"}` content blocks), as the tests
build them."""


def video_question(video, question="What happens in this video?"):
    """One user turn: a video, then a question. `video` is a path, or the video block's fields (`{"video": frames}`,
    `{"url": ...}`)."""
    block = {"type": "video", **(video if isinstance(video, dict) else {"path": str(video)})}
    return [{"role": "user", "content": [block, {"type": "text", "text": question}]}]


def image_question(image, question="Describe."):
    """One user turn: an image (a path), then a question."""
    return [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": question}]}]


def chat_inputs(processor, messages, **processor_kwargs):
    """The model's inputs for `messages` as users make them: the processor's chat template, tokenized, with the
    generation prompt; `processor_kwargs` (num_frames, ...) go to the processor."""
    return processor.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        return_tensors="pt",
        processor_kwargs=processor_kwargs,
    )


def training_sample(turns, video):
    """A sample for `CrossLMMDataCollator`: (question, answer) turns, the first question about `video` (frames)."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = ([{"type": "video"}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "videos": [video]}
