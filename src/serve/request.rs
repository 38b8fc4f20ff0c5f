//! Request bodies, parsed by hand so that every mistake gets a message that
//! names the field at fault (serde's untagged enums would only say "did not
//! match any variant"). Unknown fields are ignored, as TEI clients send
//! options we do not have (e.g. `truncate`).

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::model::Pooling;

/// `"inputs"`: one text or a list. The response mirrors the shape where the
/// route's TEI counterpart does.
pub enum Inputs {
    One(String),
    Many(Vec<String>),
}

impl Inputs {
    pub fn texts(&self) -> Vec<&str> {
        match self {
            Inputs::One(text) => vec![text.as_str()],
            Inputs::Many(texts) => texts.iter().map(String::as_str).collect(),
        }
    }

    pub fn is_one(&self) -> bool {
        matches!(self, Inputs::One(_))
    }
}

pub struct EmbedRequest {
    pub inputs: Inputs,
    pub normalize: bool,
    pub pooling: Option<Pooling>,
}

pub struct PredictRequest {
    pub inputs: Inputs,
    pub raw_scores: bool,
}

pub struct TokenizeRequest {
    pub inputs: Inputs,
    pub add_special_tokens: bool,
}

/// The body as an object, and its `"inputs"` (at most `max_inputs` texts).
fn parse(body: &[u8], max_inputs: usize) -> Result<(Inputs, Map<String, Value>), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_json(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(ApiError::validation(
            "the body must be a JSON object such as {\"inputs\": \"some text\"}",
        ));
    };
    let inputs = match fields.remove("inputs") {
        None => return Err(ApiError::validation("missing field \"inputs\"")),
        Some(Value::String(text)) => Inputs::One(text),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::validation("\"inputs\" is an empty list"));
            }
            if items.len() > max_inputs {
                return Err(ApiError::validation(format!(
                    "\"inputs\" has {} texts, more than the limit of {max_inputs} per request (--max-batch-requests)",
                    items.len()
                )));
            }
            let texts = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(text) => Ok(text),
                    other => Err(ApiError::validation(format!(
                        "\"inputs\"[{i}] is {}, expected a string",
                        kind(&other)
                    ))),
                })
                .collect::<Result<_, _>>()?;
            Inputs::Many(texts)
        }
        Some(other) => {
            return Err(ApiError::validation(format!(
                "\"inputs\" is {}, expected a string or a list of strings",
                kind(&other)
            )))
        }
    };
    Ok((inputs, fields))
}

fn flag(fields: &Map<String, Value>, name: &str, default: bool) -> Result<bool, ApiError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(value)) => Ok(*value),
        Some(other) => Err(ApiError::validation(format!(
            "\"{name}\" is {}, expected true or false",
            kind(other)
        ))),
    }
}

/// `/embed`: `normalize` defaults to true, as in TEI; `pooling` to the
/// model's own.
pub fn embed(body: &[u8], max_inputs: usize, has_pooler: bool) -> Result<EmbedRequest, ApiError> {
    let (inputs, fields) = parse(body, max_inputs)?;
    let normalize = flag(&fields, "normalize", true)?;
    let pooling = match fields.get("pooling") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(match name.as_str() {
            "mean" => Pooling::Mean,
            "cls" => Pooling::Cls,
            "pooler" if has_pooler => Pooling::Pooler,
            "pooler" => {
                return Err(ApiError::validation(
                    "\"pooling\": \"pooler\" needs pooler weights, which this model lacks; use \"mean\" or \"cls\"",
                ))
            }
            other => {
                return Err(ApiError::validation(format!(
                    "\"pooling\" is {other:?}; expected \"mean\", \"cls\" or \"pooler\""
                )))
            }
        }),
        Some(other) => {
            return Err(ApiError::validation(format!(
                "\"pooling\" is {}, expected a string",
                kind(other)
            )))
        }
    };
    Ok(EmbedRequest {
        inputs,
        normalize,
        pooling,
    })
}

/// `/predict`: `raw_scores` returns logits instead of probabilities.
pub fn predict(body: &[u8], max_inputs: usize) -> Result<PredictRequest, ApiError> {
    let (inputs, fields) = parse(body, max_inputs)?;
    let raw_scores = flag(&fields, "raw_scores", false)?;
    Ok(PredictRequest { inputs, raw_scores })
}

/// `/tokenize`: `add_special_tokens` defaults to true, as in TEI.
pub fn tokenize(body: &[u8], max_inputs: usize) -> Result<TokenizeRequest, ApiError> {
    let (inputs, fields) = parse(body, max_inputs)?;
    let add_special_tokens = flag(&fields, "add_special_tokens", true)?;
    Ok(TokenizeRequest {
        inputs,
        add_special_tokens,
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<impl Sized, ApiError>) -> (u16, String) {
        let error = result.err().expect("an error");
        (error.status.as_u16(), error.message)
    }

    #[test]
    fn inputs_take_a_string_or_a_list_of_strings() {
        let request = embed(br#"{"inputs": "hi", "truncate": true}"#, 4, false).unwrap();
        assert!(request.inputs.is_one() && request.normalize && request.pooling.is_none());
        let request = embed(
            br#"{"inputs": ["a", "b"], "normalize": false, "pooling": "cls"}"#,
            4,
            false,
        )
        .unwrap();
        assert_eq!(request.inputs.texts(), ["a", "b"]);
        assert!(!request.normalize);
        assert_eq!(request.pooling, Some(Pooling::Cls));
        assert!(
            tokenize(br#"{"inputs": "a"}"#, 4)
                .unwrap()
                .add_special_tokens
        );
        let request = tokenize(br#"{"inputs": "a", "add_special_tokens": false}"#, 4).unwrap();
        assert!(!request.add_special_tokens);
    }

    #[test]
    fn mistakes_name_the_field() {
        assert_eq!(message(tokenize(b"{", 4)).0, 400);
        assert!(message(tokenize(
            br#"{"inputs": "a", "add_special_tokens": "no"}"#,
            4
        ))
        .1
        .contains("add_special_tokens"));
        assert_eq!(
            message(tokenize(br#"{"inputs": []}"#, 4)),
            (422, "\"inputs\" is an empty list".into())
        );
        let (status, text) = message(tokenize(br#"{"inputs": ["a", 3]}"#, 4));
        assert_eq!(
            (status, text.as_str()),
            (422, "\"inputs\"[1] is a number, expected a string")
        );
        let (_, text) = message(tokenize(br#"{"inputs": ["a","b","c"]}"#, 2));
        assert!(text.contains("limit of 2"), "{text}");
        assert!(message(tokenize(br#"["a"]"#, 2)).1.contains("JSON object"));
        assert!(message(tokenize(br#"{"text": "a"}"#, 2))
            .1
            .contains("missing"));
        assert!(message(predict(br#"{"inputs": "a", "raw_scores": 1}"#, 2))
            .1
            .contains("raw_scores"));
        assert!(
            message(embed(br#"{"inputs": "a", "pooling": "max"}"#, 2, true))
                .1
                .contains("\"max\"")
        );
        assert!(
            message(embed(br#"{"inputs": "a", "pooling": "pooler"}"#, 2, false))
                .1
                .contains("lacks")
        );
    }
}
