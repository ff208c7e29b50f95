//! Chat templates: the tokenizer's own Jinja `chat_template` (rendered with minijinja and Python-compatible
//! string methods, as transformers renders it with Jinja2), or a built-in fallback for Llama 3, Llama 2, Gemma
//! and ChatML. Also finds the character spans of assistant turns, for completion-only loss masks.

use super::jsonl::Message;
use minijinja::{context, Environment, ErrorKind};
use std::ops::Range;

/// Built-in templates for tokenizers that ship none (formats from FORMATS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinTemplate {
    Llama3,
    Llama2,
    Gemma,
    ChatMl,
}

impl BuiltinTemplate {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "llama3" => BuiltinTemplate::Llama3,
            "llama2" => BuiltinTemplate::Llama2,
            "gemma" => BuiltinTemplate::Gemma,
            "chatml" => BuiltinTemplate::ChatMl,
            _ => return None,
        })
    }

    fn source(self) -> &'static str {
        match self {
            BuiltinTemplate::Llama3 => concat!(
                "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n",
                "{{ m.content | trim }}<|eot_id|>{% endfor %}",
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
            ),
            // Meta's Llama 2 chat format: the system prompt folds into the first [INST] block.
            BuiltinTemplate::Llama2 => concat!(
                "{% if messages[0].role == 'system' %}{% set sys = '<<SYS>>\n' + messages[0].content | trim + '\n<</SYS>>\n\n' %}",
                "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}",
                "{% for m in msgs %}{% if m.role == 'user' %}{{ bos_token }}[INST] {% if loop.first %}{{ sys }}{% endif %}",
                "{{ m.content | trim }} [/INST]{% else %} {{ m.content | trim }} {{ eos_token }}{% endif %}{% endfor %}"
            ),
            // Gemma has no system role: a system message is prepended to the first user turn.
            BuiltinTemplate::Gemma => concat!(
                "{{ bos_token }}{% if messages[0].role == 'system' %}{% set prefix = messages[0].content | trim + '\n\n' %}",
                "{% set msgs = messages[1:] %}{% else %}{% set prefix = '' %}{% set msgs = messages %}{% endif %}",
                "{% for m in msgs %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n",
                "{% if loop.first %}{{ prefix }}{% endif %}{{ m.content | trim }}<end_of_turn>\n{% endfor %}",
                "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
            ),
            BuiltinTemplate::ChatMl => concat!(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
            ),
        }
    }
}

/// A compiled chat template with the special tokens it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles a Jinja chat template (as found in tokenizer_config.json).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        // Python string methods (`.strip()`, `.startswith()`) that Hugging Face templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("chat template does not compile: {e}"))?;
        Ok(ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    pub fn builtin(kind: BuiltinTemplate, bos_token: &str, eos_token: &str) -> Self {
        Self::new(kind.source(), bos_token, eos_token).expect("built-in templates compile (tested)")
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let msgs: Vec<minijinja::Value> =
            messages.iter().map(|m| context! { role => m.role.clone(), content => m.content.clone() }).collect();
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        })
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => {
                format!("chat template refused the conversation: {}", e.detail().unwrap_or(""))
            }
            _ => format!("chat template failed: {e}"),
        })
    }

    /// The whole conversation and the character ranges the model should learn: each assistant turn's content
    /// and the end-of-turn marker right after it (one of `end_markers`, e.g. `<|eot_id|>`), so the model learns
    /// to stop. The start of a turn is where the template's generation prompt ends, which requires the template
    /// to render conversations incrementally (every template in common use does).
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
        end_markers: &[&str],
    ) -> Result<(String, Vec<Range<usize>>), String> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            if !full.starts_with(&before) {
                return Err(format!(
                    "the chat template does not render message {i} incrementally, so assistant tokens cannot be located; \
                     train on every token instead"
                ));
            }
            // Templates either keep the content as is or trim it; look for it as is first.
            let rest = &full[before.len()..];
            let found = [m.content.as_str(), m.content.trim()].into_iter().find_map(|c| rest.find(c).map(|at| (at, c)));
            let Some((at, content)) = found else {
                return Err(format!("assistant message {i} does not appear in the rendered conversation"));
            };
            let mut end = before.len() + at + content.len();
            if let Some(marker) =
                end_markers.iter().filter(|mk| !mk.is_empty()).find(|mk| full[end..].starts_with(**mk))
            {
                end += marker.len();
            }
            spans.push(before.len()..end);
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    fn convo() -> Vec<Message> {
        vec![
            msg("system", "Be brief."),
            msg("user", "Hi"),
            msg("assistant", " Hello! "),
            msg("user", "Bye"),
            msg("assistant", "Bye."),
        ]
    }

    #[test]
    fn llama3_format_and_spans() {
        let t = ChatTemplate::builtin(BuiltinTemplate::Llama3, "<|begin_of_text|>", "<|eot_id|>");
        let (text, spans) = t.render_with_assistant_spans(&convo(), &["<|eot_id|>"]).unwrap();
        assert!(text.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"));
        let learned: Vec<&str> = spans.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(learned, vec!["Hello!<|eot_id|>", "Bye.<|eot_id|>"]);
        let prompt = t.render(&convo()[..2], true).unwrap();
        assert!(prompt.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    }

    #[test]
    fn gemma_folds_system_into_first_user_turn() {
        let t = ChatTemplate::builtin(BuiltinTemplate::Gemma, "<bos>", "<eos>");
        let (text, spans) = t.render_with_assistant_spans(&convo(), &["<end_of_turn>"]).unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nBye.<end_of_turn>\n"
        );
        assert_eq!(&text[spans[1].clone()], "Bye.<end_of_turn>");
    }

    #[test]
    fn chatml_and_llama2() {
        let t = ChatTemplate::builtin(BuiltinTemplate::ChatMl, "", "<|im_end|>");
        let (text, spans) = t.render_with_assistant_spans(&convo()[1..3], &["<|im_end|>"]).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! <|im_end|>\n");
        assert_eq!(&text[spans[0].clone()], " Hello! <|im_end|>");
        let t = ChatTemplate::builtin(BuiltinTemplate::Llama2, "<s>", "</s>");
        let text = t.render(&convo(), false).unwrap();
        assert_eq!(
            text,
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST] Bye. </s>"
        );
    }

    #[test]
    fn hugging_face_templates_with_python_methods_and_exceptions() {
        // The shape of Gemma 3's shipped template: raise_exception on bad role order, `is string`, pycompat.
        let src = "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}\
                   {{ raise_exception('Conversation roles must alternate') }}{% endif %}\
                   {{ m['role'].upper() }}:{{ m['content'].strip() }}\n{% endfor %}";
        let t = ChatTemplate::new(src, "<bos>", "<eos>").unwrap();
        assert_eq!(
            t.render(&[msg("user", " a "), msg("assistant", "b")], false).unwrap(),
            "<bos>USER:a\nASSISTANT:b\n"
        );
        let e = t.render(&[msg("assistant", "b")], false).unwrap_err();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }

    fn shipped(name: &str) -> String {
        let path = format!("{}/../tests/fixtures/templates/{name}.jinja", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn real_llama3_and_gemma3_templates() {
        let convo = [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye"), msg("assistant", "Bye.")];
        let t = ChatTemplate::new(&shipped("llama3"), "<|begin_of_text|>", "<|end_of_text|>").unwrap();
        let (text, spans) = t.render_with_assistant_spans(&convo, &["<|eot_id|>"]).unwrap();
        assert!(
            text.starts_with("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"),
            "{text}"
        );
        let learned: Vec<&str> = spans.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(learned, vec!["Hello!<|eot_id|>", "Bye.<|eot_id|>"]);

        let t = ChatTemplate::new(&shipped("gemma3"), "<bos>", "<end_of_turn>").unwrap();
        let mut with_system = vec![msg("system", "Be brief.")];
        with_system.extend(convo.iter().cloned());
        let (text, spans) = t.render_with_assistant_spans(&with_system, &["<end_of_turn>"]).unwrap();
        assert!(
            text.starts_with("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"),
            "{text}"
        );
        assert_eq!(&text[spans[0].clone()], "Hello!<end_of_turn>");
        let e = t.render(&[msg("assistant", "x")], false).unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
    }
}
